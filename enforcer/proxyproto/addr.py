"""Address text <-> bytes for both header versions, strictly.

IPv4 text must be canonical dotted decimal (four numbers 0-255, no leading zeros: the
spec forbids them to avoid octal confusion); checking that ``inet_ntoa(inet_pton(s)) == s``
enforces exactly that with two C calls. IPv6 text is anything ``inet_pton`` accepts
(hex groups, one ``::``, an embedded dotted IPv4 tail; no zone id) and is returned in
``inet_ntop`` form. UNIX paths travel in 108-byte NUL-padded fields; a Linux abstract name
(leading NUL) is written ``@name``, as ``ss`` and systemd do.
"""

from __future__ import annotations

import socket

from enforcer.proxyproto.constants import UNIX_PATH_LENGTH

_inet_pton = socket.inet_pton
_inet_ntop = socket.inet_ntop
_AF_INET = socket.AF_INET
_AF_INET6 = socket.AF_INET6


def ipv4_packed(text: str) -> bytes | None:
    """Packed IPv4 for canonical dotted-decimal ``text``, else None."""
    try:
        packed = _inet_pton(_AF_INET, text)
    except (OSError, ValueError):
        return None
    return packed if socket.inet_ntoa(packed) == text else None


def ipv6_packed(text: str) -> bytes | None:
    """Packed IPv6 for ``text``, else None (no zone ids)."""
    try:
        return _inet_pton(_AF_INET6, text)
    except (OSError, ValueError):
        return None


def ipv4_text(packed: bytes) -> str:
    return socket.inet_ntoa(packed)


def ipv6_text(packed: bytes) -> str:
    return _inet_ntop(_AF_INET6, packed)


def unix_text(raw: bytes) -> str:
    """A 108-byte sun_path field as text (``@name`` for abstract sockets)."""
    if raw[:1] == b"\x00":
        name = raw[1:].rstrip(b"\x00")
        return "@" + name.decode("utf-8", "backslashreplace") if name else ""
    return raw.split(b"\x00", 1)[0].decode("utf-8", "backslashreplace")


def unix_packed(path: str) -> bytes:
    """``path`` as a 108-byte NUL-padded sun_path field; ValueError if it does not fit."""
    raw = b"\x00" + path[1:].encode("utf-8") if path.startswith("@") else path.encode("utf-8")
    if len(raw) > UNIX_PATH_LENGTH:
        raise ValueError(f"UNIX path {path!r} is longer than {UNIX_PATH_LENGTH} bytes")
    if b"\x00" in raw[1:]:
        raise ValueError(f"UNIX path {path!r} contains a NUL byte")
    return raw.ljust(UNIX_PATH_LENGTH, b"\x00")
