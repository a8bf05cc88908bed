"""The SOCKS5 handshake, server side (RFC 1928; username/password RFC 1929), sans-IO.

How it works. ``Socks5Parser.feed`` takes bytes from the client in any pieces; ``step``
then returns the next event, or None when more bytes are needed:

- ``Send(data)``: bytes for the client (the method selected), then call ``step`` again;
- ``Login(user, password)``: check them, then ``login_result(ok)`` gives the bytes to send
  (a refusal raises);
- ``Done(request, rest)``: the CONNECT request, and any bytes the client sent after it.

States: GREETING (version 5, methods) -> [LOGIN] -> REQUEST -> DONE. Only CONNECT is
served; BIND and UDP ASSOCIATE are refused with reply 0x07. A problem raises
``Socks5Error`` with a short reason (the metric label) and the bytes to send before
closing (None when the client does not speak SOCKS5, so nothing it would read exists).

Bounded: each message has a maximum size fixed by its length bytes (a greeting 257, a
login 513, a request 262 bytes), and at most ``MAX_BUFFER`` bytes are held before the
request is done (a client may send its request behind its greeting, but no more).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final, Literal

from enforcer.egress.hosts import BadHost, normalize_host

VERSION: Final = 5
NO_AUTH: Final = 0x00
USERPASS: Final = 0x02
NO_ACCEPTABLE: Final = 0xFF
CMD_CONNECT: Final = 1
ATYP_IPV4: Final = 1
ATYP_DOMAIN: Final = 3
ATYP_IPV6: Final = 4
MAX_BUFFER: Final = 4096

# Reply codes (RFC 1928 section 6)
SUCCEEDED: Final = 0x00
GENERAL_FAILURE: Final = 0x01
NOT_ALLOWED: Final = 0x02
NETWORK_UNREACHABLE: Final = 0x03
HOST_UNREACHABLE: Final = 0x04
CONNECTION_REFUSED: Final = 0x05
TTL_EXPIRED: Final = 0x06
COMMAND_NOT_SUPPORTED: Final = 0x07
ADDRESS_TYPE_NOT_SUPPORTED: Final = 0x08

AddressKind = Literal["ipv4", "ipv6", "domain"]


class Socks5Error(Exception):
    """A refused handshake: ``reason`` for metrics and records, ``reply`` to send first."""

    def __init__(self, reason: str, message: str, reply: bytes | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Request:
    host: str  # normalised (hosts.normalize_host)
    port: int
    kind: AddressKind


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Login:
    user: bytes
    password: bytes


@dataclass(frozen=True, slots=True)
class Done:
    request: Request
    rest: bytes


Event = Send | Login | Done


def reply(code: int, bound: tuple[str, int] | None = None) -> bytes:
    """A reply: the code and the bound address (the proxy's end of the upstream
    connection on success; 0.0.0.0:0 otherwise or when unknown)."""
    host, port = bound if bound is not None else ("0.0.0.0", 0)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        ip = ipaddress.IPv4Address(0)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((VERSION, code, 0, atyp)) + ip.packed + (port & 0xFFFF).to_bytes(2, "big")


_GREETING, _LOGIN, _LOGIN_WAIT, _REQUEST, _DONE = range(5)


class Socks5Parser:
    """One client's handshake; ``login`` says whether username/password is required."""

    __slots__ = ("buf", "login", "state")

    def __init__(self, *, login: bool) -> None:
        self.login = login
        self.buf = bytearray()
        self.state = _GREETING

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def feed(self, data: bytes | memoryview) -> None:
        self.buf += data
        if self.state != _DONE and len(self.buf) > MAX_BUFFER:
            raise Socks5Error("too_long", f"more than {MAX_BUFFER} bytes before the request "
                              "was complete", None)

    def step(self) -> Event | None:
        if self.state == _GREETING:
            return self._greeting()
        if self.state == _LOGIN:
            return self._login()
        if self.state == _REQUEST:
            return self._request()
        return None

    def login_result(self, ok: bool) -> bytes:
        """The RFC 1929 status for the client; raises ``Socks5Error`` when refused."""
        if self.state != _LOGIN_WAIT:
            raise RuntimeError("login_result without a pending Login")
        if not ok:
            raise Socks5Error("bad_credentials", "wrong user name or password", b"\x01\x01")
        self.state = _REQUEST
        return b"\x01\x00"

    def _greeting(self) -> Event | None:
        buf = self.buf
        if not buf:
            return None
        if buf[0] != VERSION:
            what = "SOCKS4" if buf[0] == 4 else f"version byte {buf[0]:#04x}"
            raise Socks5Error("bad_version", f"not a SOCKS5 greeting ({what})", None)
        if len(buf) < 2:
            return None
        count = buf[1]
        if count == 0:
            raise Socks5Error("no_methods", "the greeting offers no method",
                              bytes((VERSION, NO_ACCEPTABLE)))
        if len(buf) < 2 + count:
            return None
        methods = bytes(buf[2:2 + count])
        del buf[:2 + count]
        want = USERPASS if self.login else NO_AUTH
        if want not in methods:
            needed = "username/password (0x02)" if self.login else "no authentication (0x00)"
            raise Socks5Error("no_acceptable_method", f"the client does not offer {needed}",
                              bytes((VERSION, NO_ACCEPTABLE)))
        self.state = _LOGIN if self.login else _REQUEST
        return Send(bytes((VERSION, want)))

    def _login(self) -> Event | None:
        buf = self.buf
        if not buf:
            return None
        if buf[0] != 1:
            raise Socks5Error("bad_login", f"username/password version {buf[0]} (not 1)",
                              b"\x01\x01")
        if len(buf) < 2:
            return None
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return None
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return None
        user, password = bytes(buf[2:2 + ulen]), bytes(buf[3 + ulen:end])
        del buf[:end]
        self.state = _LOGIN_WAIT
        return Login(user, password)

    def _request(self) -> Event | None:
        buf = self.buf
        if len(buf) < 4:
            if buf and buf[0] != VERSION:
                raise Socks5Error("bad_version", f"request version byte {buf[0]:#04x}",
                                  reply(GENERAL_FAILURE))
            return None
        if buf[0] != VERSION:
            raise Socks5Error("bad_version", f"request version byte {buf[0]:#04x}",
                              reply(GENERAL_FAILURE))
        atyp = buf[3]
        if atyp == ATYP_IPV4:
            end = 4 + 4 + 2
        elif atyp == ATYP_IPV6:
            end = 4 + 16 + 2
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return None
            end = 5 + buf[4] + 2
        else:
            raise Socks5Error("bad_address_type", f"address type {atyp:#04x}",
                              reply(ADDRESS_TYPE_NOT_SUPPORTED))
        if len(buf) < end:
            return None
        cmd = buf[1]
        if cmd != CMD_CONNECT:
            what = {2: "BIND", 3: "UDP ASSOCIATE"}.get(cmd, f"command {cmd:#04x}")
            raise Socks5Error("command_not_supported", f"{what} is not supported (CONNECT "
                              "only)", reply(COMMAND_NOT_SUPPORTED))
        request = _address(bytes(buf[4:end - 2]), atyp, int.from_bytes(buf[end - 2:end], "big"))
        rest = bytes(buf[end:])
        buf.clear()
        self.state = _DONE
        return Done(request, rest)


def _address(raw: bytes, atyp: int, port: int) -> Request:
    if port == 0:
        raise Socks5Error("bad_address", "port 0 requested", reply(GENERAL_FAILURE))
    if atyp == ATYP_IPV4:
        return Request(str(ipaddress.IPv4Address(raw)), port, "ipv4")
    if atyp == ATYP_IPV6:
        ip6 = ipaddress.IPv6Address(raw)
        mapped = ip6.ipv4_mapped
        return Request(str(mapped if mapped is not None else ip6), port, "ipv6")
    try:
        host = normalize_host(raw[1:].decode("ascii"))
    except (UnicodeDecodeError, BadHost) as exc:
        why = "a host name that is not ASCII" if isinstance(exc, UnicodeDecodeError) else exc
        raise Socks5Error("bad_address", f"{why}", reply(GENERAL_FAILURE)) from None
    return Request(host, port, "domain")
