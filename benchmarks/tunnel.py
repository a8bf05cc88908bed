"""The client side of the two egress proxy handshakes, and the check of an HTTP response,
sans-IO (the egress load tool drives them; they are tested alone).

How it works. A ``Handshake`` knows the bytes to send first (``first``) and, fed the
proxy's answers in any pieces (``feed``), returns what to send next and whether the tunnel
is open, plus any bytes that came after the proxy's last answer (they belong to the
destination). A refusal raises ``TunnelError`` naming what the proxy said.

- SOCKS5 (RFC 1928): greeting offering one method (0x00 none, or 0x02 username/password),
  the method reply, the RFC 1929 login when asked for, then CONNECT to an IPv4 address
  and the reply, whose length depends on its address type.
- HTTP CONNECT (RFC 9110 9.3.6): ``CONNECT host:port HTTP/1.1`` with ``Host`` (and
  ``Proxy-Authorization: Basic`` with a login), answered by a 2xx status and a header
  block.

``Response`` reads one HTTP/1.1 response with a ``Content-Length`` and compares the
body's sha256 with the expected one, hashing as the bytes arrive (bodies of many MiB are
never held).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

MAX_HEAD: Final = 16384  # an answer header block larger than this is an error
SOCKS_REPLIES: Final = {1: "general failure", 2: "not allowed by ruleset",
                        3: "network unreachable", 4: "host unreachable",
                        5: "connection refused", 6: "TTL expired",
                        7: "command not supported", 8: "address type not supported"}


class TunnelError(Exception):
    """The proxy refused, or answered something that is not its protocol."""


@dataclass(frozen=True)
class Login:
    user: str
    password: str


class Handshake:
    """Base: ``first()`` then ``feed(data)`` until it reports the tunnel open."""

    def first(self) -> bytes:
        raise NotImplementedError

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        """(bytes to send now, tunnel open?, bytes after the proxy's last answer)."""
        raise NotImplementedError


class Socks5(Handshake):
    def __init__(self, host: str, port: int, login: Login | None = None) -> None:
        self.addr = ipaddress.IPv4Address(host).packed
        self.port = port
        self.login = login
        self.buf = b""
        self.state = "method"

    def first(self) -> bytes:
        return bytes((5, 1, 2 if self.login else 0))

    def _request(self) -> bytes:
        return b"\x05\x01\x00\x01" + self.addr + struct.pack("!H", self.port)

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        self.buf += data
        if self.state == "method":
            if len(self.buf) < 2:
                return b"", False, b""
            ver, method = self.buf[0], self.buf[1]
            self.buf = self.buf[2:]
            if ver != 5 or method != (2 if self.login else 0):
                raise TunnelError(f"SOCKS5 method reply {ver:#x} {method:#x}")
            if self.login:
                self.state = "login"
                user, password = self.login.user.encode(), self.login.password.encode()
                return (bytes((1, len(user))) + user + bytes((len(password),)) + password,
                        False, b"")
            self.state = "reply"
            return self._request(), False, b""
        if self.state == "login":
            if len(self.buf) < 2:
                return b"", False, b""
            status = self.buf[1]
            self.buf = self.buf[2:]
            if status != 0:
                raise TunnelError(f"SOCKS5 login refused (status {status:#x})")
            self.state = "reply"
            return self._request(), False, b""
        return b"", *self._reply()

    def _reply(self) -> tuple[bool, bytes]:
        if len(self.buf) < 2:
            return False, b""
        ver, rep = self.buf[0], self.buf[1]
        if ver != 5 or rep != 0:  # a refusal is final whatever follows
            raise TunnelError(f"SOCKS5 CONNECT refused: reply {rep:#x} "
                              f"({SOCKS_REPLIES.get(rep, 'unknown')})")
        if len(self.buf) < 5:
            return False, b""
        atyp = self.buf[3]
        size = {1: 4, 4: 16, 3: 1 + self.buf[4]}.get(atyp)
        if size is None:
            raise TunnelError(f"SOCKS5 reply with address type {atyp:#x}")
        end = 4 + size + 2
        if len(self.buf) < end:
            return False, b""
        rest, self.buf = self.buf[end:], b""
        self.state = "open"
        return True, rest


class HttpConnect(Handshake):
    def __init__(self, host: str, port: int, login: Login | None = None) -> None:
        self.authority = f"{host}:{port}"
        self.login = login
        self.buf = b""

    def first(self) -> bytes:
        auth = ""
        if self.login:
            token = base64.b64encode(f"{self.login.user}:{self.login.password}".encode())
            auth = f"Proxy-Authorization: Basic {token.decode()}\r\n"
        return (f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n{auth}\r\n"
                .encode())

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                raise TunnelError(f"CONNECT answer without an end after {MAX_HEAD} bytes")
            return b"", False, b""
        status_line = self.buf[:self.buf.find(b"\r\n")]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].startswith(b"2"):
            raise TunnelError(f"CONNECT refused: {status_line[:80].decode('latin-1')!r}")
        rest, self.buf = self.buf[end + 4:], b""
        return b"", True, rest


def handshake(protocol: str, host: str, port: int, login: Login | None = None) -> Handshake:
    if protocol == "socks5":
        return Socks5(host, port, login)
    if protocol == "http_connect":
        return HttpConnect(host, port, login)
    raise ValueError(f"unknown proxy protocol {protocol!r}")


class Response:
    """One HTTP/1.1 response: status 200, a Content-Length, a body with the expected
    sha256. ``feed`` returns True once the body is complete (and checked)."""

    def __init__(self, size: int, sha256: str) -> None:
        self.size, self.sha256 = size, sha256
        self.head = b""
        self.left: int | None = None  # body bytes still to come, once the head is read
        self.hash = hashlib.sha256()

    def feed(self, data: memoryview | bytes) -> bool:
        if self.left is None:
            self.head += bytes(data)
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    raise TunnelError("response head over 16 KiB")
                return False
            self._check_head(self.head[:end])
            data, self.left = memoryview(self.head)[end + 4:], self.size
        if len(data) > self.left:
            raise TunnelError(f"{len(data) - self.left} bytes after the response body")
        self.hash.update(data)
        self.left -= len(data)
        if self.left:
            return False
        if self.hash.hexdigest() != self.sha256:
            raise TunnelError("response body differs from the backend's file (sha256)")
        return True

    def _check_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 200"):
            raise TunnelError(f"response {lines[0][:80].decode('latin-1')!r}")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                if int(value.strip()) != self.size:
                    raise TunnelError(f"Content-Length {value.strip().decode()} "
                                      f"instead of {self.size}")
                return
        raise TunnelError("response without Content-Length")
