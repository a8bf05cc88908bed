"""The HTTP/1.1 CONNECT request, proxy side, sans-IO, and the responses to it.

How it works. ``ConnectParser.feed`` takes the client's bytes in any pieces and returns
None until the header block ends (an empty line), then a ``ConnectRequest`` with the
authority asked for (``host:port``, ``[v6]:port``), the ``Proxy-Authorization`` value if
any, and the bytes after the header block (a client may send its first bytes behind the
request). At most ``max_bytes`` of header are read (else 431) and ``MAX_FIELDS`` fields.
Lines end with CRLF (a bare LF is accepted, as RFC 9112 allows). A problem raises
``HttpError`` with a reason (the metric label) and the status to answer with: 405 for
another method, 400 for a malformed request, 431 for an oversized one.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

from enforcer.egress.hosts import BadHost, normalize_host

MAX_BYTES: Final = 8192
MAX_FIELDS: Final = 100
_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_END: Final = re.compile(rb"\r?\n\r?\n")
REASONS: Final = {200: "Connection established", 400: "Bad Request", 403: "Forbidden",
                  405: "Method Not Allowed", 407: "Proxy Authentication Required",
                  408: "Request Timeout", 431: "Request Header Fields Too Large",
                  502: "Bad Gateway", 504: "Gateway Timeout"}


class HttpError(Exception):
    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    host: str  # normalised (hosts.normalize_host)
    port: int
    authorization: str | None  # the Proxy-Authorization value
    rest: bytes


class ConnectParser:
    __slots__ = ("buf", "max_bytes")

    def __init__(self, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.buf = bytearray()

    def feed(self, data: bytes | memoryview) -> ConnectRequest | None:
        start = max(0, len(self.buf) - 3)
        self.buf += data
        end = _END.search(self.buf, start)
        if end is None:
            if len(self.buf) > self.max_bytes:
                raise HttpError("too_long", 431, f"no end of the request header within "
                                f"{self.max_bytes} bytes")
            return None
        if end.start() > self.max_bytes:
            raise HttpError("too_long", 431, f"request header longer than {self.max_bytes} "
                            "bytes")
        head, rest = bytes(self.buf[:end.start()]), bytes(self.buf[end.end():])
        self.buf.clear()
        return _parse(head, rest)


def _parse(head: bytes, rest: bytes) -> ConnectRequest:
    lines = head.split(b"\n")
    line = lines[0].removesuffix(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise HttpError("bad_request", 400, f"bad request line {_show(line)}")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HttpError("bad_request", 400, f"unsupported HTTP version {_show(version)}")
    if method != b"CONNECT":
        raise HttpError("bad_method", 405, f"method {_show(method)} (only CONNECT is served)")
    if len(lines) - 1 > MAX_FIELDS:
        raise HttpError("too_long", 431, f"more than {MAX_FIELDS} header fields")
    authorization: str | None = None
    for raw in lines[1:]:
        name, value = _field(raw.removesuffix(b"\r"))
        if name == b"proxy-authorization":
            if authorization is not None:
                raise HttpError("bad_request", 400, "more than one Proxy-Authorization field")
            authorization = value
    host, port = _authority(target)
    return ConnectRequest(host, port, authorization, rest)


def _field(line: bytes) -> tuple[bytes, str]:
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise HttpError("bad_request", 400, f"bad header field {_show(line)}")
    text = value.strip(b" \t").decode("latin-1")  # latin-1 decodes any byte
    if any(c in text for c in "\r\n\0"):
        raise HttpError("bad_request", 400, f"bad header value in {_show(name)}")
    return name.lower(), text


def _authority(target: bytes) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (RFC 9110 authority-form, port required)."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError("bad_request", 400, "a CONNECT target that is not ASCII") from None
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise HttpError("bad_request", 400, f"CONNECT target {_show(target)} is not host:port")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536 or len(port_text) > 5:
        raise HttpError("bad_request", 400, f"bad port in CONNECT target {_show(target)}")
    if ":" in host and not host.startswith("["):
        raise HttpError("bad_request", 400, f"an IPv6 CONNECT target needs brackets: "
                        f"{_show(target)}")
    try:
        return normalize_host(host), int(port_text)
    except BadHost as exc:
        raise HttpError("bad_request", 400, str(exc)) from None


def basic_credentials(value: str) -> tuple[bytes, bytes] | None:
    """(user, password) from a ``Basic`` Proxy-Authorization value; None if it is not one."""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = raw.partition(b":")
    return (user, password) if colon else None


def response(status: int, body: str = "", *, realm: str | None = None) -> bytes:
    """A response; a refusal carries a one-line text body and closes the connection."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    if status == 200:
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    if realm is not None:
        lines.append(f'Proxy-Authenticate: Basic realm="{realm}"')
    if status == 405:
        lines.append("Allow: CONNECT")
    payload = (body + "\n").encode("utf-8", "replace") if body else b""
    lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(payload)}",
              "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + payload


def _show(raw: bytes) -> str:
    text = raw[:64].decode("ascii", "replace")
    return repr(text + ("..." if len(raw) > 64 else ""))
