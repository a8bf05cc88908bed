"""ClientHellos for tests and the fuzz corpus: real ones (OpenSSL through Python's ssl, no
socket) and hand-built ones, cut into TLS records of any size."""

from __future__ import annotations

import contextlib
import os
import ssl
import struct


def real_hello(sni: str | None, *, alpn: list[str] | None = None,
               max_version: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of an OpenSSL client (one record holding the ClientHello)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def hello_message(data: bytes) -> bytes:
    """The handshake message (type, length, body) inside one-record first flight."""
    assert data[0] == 0x16
    return data[5:]


def ext(kind: int, body: bytes) -> bytes:
    return struct.pack("!HH", kind, len(body)) + body


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(struct.pack("!BH", name_type, len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def hello_body(extensions: list[bytes] | None, *, version: int = 0x0303,
               session_id: bytes = b"", suites: bytes = b"\x13\x01\x13\x02",
               compression: bytes = b"\x00") -> bytes:
    body = struct.pack("!H", version) + os.urandom(32)
    body += bytes([len(session_id)]) + session_id
    body += struct.pack("!H", len(suites)) + suites
    body += bytes([len(compression)]) + compression
    if extensions is not None:
        joined = b"".join(extensions)
        body += struct.pack("!H", len(joined)) + joined
    return body


def handshake(body: bytes, msg_type: int = 1) -> bytes:
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: list[int] | None = None, *, version: int = 0x0301,
            kind: int = 0x16) -> bytes:
    """``message`` cut into records of the given sizes (the last takes the rest)."""
    out, at = bytearray(), 0
    for size in [*(sizes or []), len(message)]:
        if at >= len(message):
            break
        chunk = message[at:at + size]
        out += struct.pack("!BHH", kind, version, len(chunk)) + chunk
        at += len(chunk)
    return bytes(out)


def hello(sni: bytes | None = b"api.example.test", extra: list[bytes] | None = None,
          sizes: list[int] | None = None) -> bytes:
    """A hand-built ClientHello with ``sni`` (and ``extra`` extensions), in records."""
    exts = ([sni_ext(sni)] if sni is not None else []) + (extra or [])
    return records(handshake(hello_body(exts)), sizes)
