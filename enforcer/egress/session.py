"""An egress listener's part of one connection: the SOCKS5 or CONNECT exchange, the
login check, and the reply that tells the client how its request ended.

How it works. The request is a step of the connection's AUTHORIZE stage that the
lifecycle core (lifecycle.py) knows: on an egress listener, after the PROXY header and
the TLS handshake (so the client's certificate is known), the core arms
``egress.request_timeout`` and asks for ``start_request`` before the policy. The
connection then calls:

- ``EgressSession(conn, rt, proceed)`` on ``start_request``;
- ``EgressSession.feed(data)`` for each client byte (plaintext, after TLS) until the
  request is complete: it returns the bytes after the request then, else None; when that
  happens later (after a login checked in the scrypt pool, logincheck.py),
  ``proceed(rest)`` continues the connection (which tells the core ``request_done``: the policy decides);
- ``EgressSession.established()`` once the upstream is connected and the decision is
  allow: the success reply (SOCKS5 0x00 with the bound address, or ``200 Connection
  established``), before any byte is relayed;
- ``EgressSession.closing(action, reason)`` from the connection's ``_finish``: if the
  client got no reply yet, the refusal that fits (policy deny: SOCKS5 0x02 / 403;
  resolve failure or EHOSTUNREACH: 0x04 / 502; ECONNREFUSED: 0x05 / 502; ENETUNREACH:
  0x03 / 502; a connect timeout: 0x06 / 504; anything else 0x01 / 502). The core's
  ``request_timeout`` closes with ``egress_timeout``: the refusal is sent from here too.

When the request is complete the destination becomes the connection's ``original_dst``
(so facts, connect and the flow record treat it as a transparent listener's destination)
and ``host`` feeds the ``to.hosts`` rule key. Nothing is resolved here: the name goes to
the dialer only after policy allowed it, and each address it resolves to is decided on
again before any connect (egress/resolved.py; none allowed: ``denied_resolved_address``,
refused like a policy deny).

A refused handshake (bad version, no acceptable method, wrong login, a login refused
unchecked because the scrypt pool is full (``login_busy``), BIND, a malformed
or oversized request, silence past the timeout) gets its reply where the protocol has
one, and closes with reason ``egress_<reason>`` (``Connection.refuse``; each is in
lifecycle.REASONS), counted in ``enforcer_egress_handshake_errors_total``.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from enforcer.config.model import EgressConfig
from enforcer.dataplane.tasks import spawn
from enforcer.egress import httpconnect, socks5
from enforcer.egress.credentials import Credentials

if TYPE_CHECKING:
    from enforcer.dataplane.connection import Connection

Proceed = Callable[[bytes], None]
HELD_LIMIT: Final = 64 * 1024

_SOCKS_ERRNO: Final = {errno.ECONNREFUSED: socks5.CONNECTION_REFUSED,
                       errno.ENETUNREACH: socks5.NETWORK_UNREACHABLE,
                       errno.EHOSTUNREACH: socks5.HOST_UNREACHABLE,
                       errno.ETIMEDOUT: socks5.TTL_EXPIRED}


@dataclass(slots=True, eq=False)
class EgressRuntime:
    """Per listener: its egress settings, users and metric."""

    protocol: str  # socks5 | http_connect
    cfg: EgressConfig
    credentials: Credentials | None
    errors: Any  # enforcer_egress_handshake_errors_total
    listener: str

    @property
    def realm(self) -> str:
        return "".join(c for c in self.listener if c not in '"\\') or "enforcer"


def make_runtime(listener: str, protocol: str, cfg: EgressConfig, metrics: Any) -> EgressRuntime:
    """Raises ``CredentialsError`` when the credentials file cannot be used."""
    creds = Credentials(cfg.credentials) if cfg.credentials is not None else None
    return EgressRuntime(protocol, cfg, creds, metrics.egress_handshake_errors_total, listener)


class EgressSession:
    __slots__ = ("address", "auth_task", "conn", "done", "errno", "held", "host", "http", "port",
                 "proceed", "replied", "rt", "socks", "user")

    def __init__(self, conn: Connection, rt: EgressRuntime, proceed: Proceed) -> None:
        self.conn: Connection | None = conn
        self.rt = rt
        self.proceed = proceed
        self.socks = (socks5.Socks5Parser(login=rt.credentials is not None)
                      if rt.protocol == "socks5" else None)
        self.http = (httpconnect.ConnectParser(rt.cfg.max_request_bytes)
                     if rt.protocol == "http_connect" else None)
        self.done = False  # the request is complete (host and port known)
        self.replied = False  # the client has its final reply (success or refusal)
        self.host: str | None = None
        self.port: int | None = None
        self.user: str | None = None
        self.errno: int | None = None  # of a failed upstream connect
        self.address: str | None = None  # the IP address connected to (reload re-decisions)
        self.auth_task: asyncio.Task[None] | None = None
        self.held = bytearray()  # http_connect: client bytes that came during a login check

    # ------------------------------------------------------------------ client bytes
    def feed(self, data: bytes | memoryview) -> bytes | None:
        """The bytes after the request once it is complete, else None."""
        if self.conn is None:  # refused already: nothing more is read
            return None
        try:
            if self.socks is not None:
                self.socks.feed(data)
                return None if self.auth_task is not None else self._socks_advance()
            assert self.http is not None
            if self.auth_task is not None:  # bytes behind the request, while its login
                self.held += data  # is checked: they follow the request's own
                if len(self.held) > HELD_LIMIT:
                    raise httpconnect.HttpError("too_long", 431, f"more than {HELD_LIMIT} "
                                                "bytes sent before the request's answer")
                return None
            request = self.http.feed(data)
            return None if request is None else self._http_request(request)
        except socks5.Socks5Error as exc:
            self._refuse(exc.reason, str(exc), exc.reply)
        except httpconnect.HttpError as exc:
            realm = self.rt.realm if exc.status == 407 else None
            self._refuse(exc.reason, str(exc), httpconnect.response(exc.status, str(exc),
                                                                    realm=realm))
        return None

    def _socks_advance(self) -> bytes | None:
        parser = self.socks
        assert parser is not None
        while True:
            event = parser.step()
            if event is None:
                return None
            if isinstance(event, socks5.Send):
                self._send(event.data)
            elif isinstance(event, socks5.Login):
                ok = self._login(event.user, event.password)
                if ok is None:
                    return None
                self._send(parser.login_result(ok))
            else:
                self._request(event.request.host, event.request.port)
                return event.rest

    def _http_request(self, request: httpconnect.ConnectRequest) -> bytes | None:
        if self.rt.credentials is not None:
            creds = (httpconnect.basic_credentials(request.authorization)
                     if request.authorization is not None else None)
            if creds is None:
                raise httpconnect.HttpError(
                    "auth_required", 407, "proxy authentication required" if
                    request.authorization is None else "only Basic proxy authentication")
            ok = self._login(*creds, request=request)
            if ok is None:
                return None
            if not ok:
                raise httpconnect.HttpError("bad_credentials", 407,
                                            "wrong user name or password")
        self._request(request.host, request.port)
        return request.rest

    # ------------------------------------------------------------------ login
    def _login(self, user: bytes, password: bytes,
               request: httpconnect.ConnectRequest | None = None) -> bool | None:
        """True/False, or None while the scrypt check runs (the connection then goes on);
        raises the protocol's error when the scrypt pool is full (logincheck.py)."""
        creds = self.rt.credentials
        assert creds is not None
        creds = creds.current()
        if creds.check(user, password):
            self.user = user.decode("utf-8", "replace")
            return True
        assert self.conn is not None
        outcome = creds.start_check(user, password, self.conn.loop)
        if outcome is None:
            busy = (f"more than {creds.pool.limit} login checks unfinished: refused without "
                    "checking, try again")
            if request is None:
                raise socks5.Socks5Error("login_busy", busy, b"\x01\x01")
            raise httpconnect.HttpError("login_busy", 407, busy)

        async def wait() -> None:
            ok = await asyncio.shield(outcome)  # other logins may wait for it too
            self.auth_task = None
            if ok:
                self.user = user.decode("utf-8", "replace")
            self._checked(ok, request)

        self.auth_task = spawn(wait(), name="egress-login")
        return None

    def _checked(self, ok: bool, request: httpconnect.ConnectRequest | None) -> None:
        conn = self.conn
        if conn is None:
            return
        try:
            rest: bytes | None
            if request is not None:
                if not ok:
                    raise httpconnect.HttpError("bad_credentials", 407,
                                                "wrong user name or password")
                self._request(request.host, request.port)
                rest = request.rest + bytes(self.held)
                self.held.clear()
            else:
                assert self.socks is not None
                self._send(self.socks.login_result(ok))
                rest = self._socks_advance()
            if rest is not None:
                self.proceed(rest)
        except socks5.Socks5Error as exc:
            self._refuse(exc.reason, str(exc), exc.reply)
        except httpconnect.HttpError as exc:
            self._refuse(exc.reason, str(exc), httpconnect.response(
                exc.status, str(exc), realm=self.rt.realm))
        except Exception as exc:
            conn.internal_error(exc)

    # ------------------------------------------------------------------ outcome
    def _request(self, host: str, port: int) -> None:
        self.host, self.port, self.done = host, port, True
        if self.conn is not None:
            self.conn.original_dst = (host, port)

    def established(self) -> None:
        """The upstream is connected and allowed: the success reply."""
        conn = self.conn
        if self.replied or conn is None:
            return
        self.replied = True
        up = conn.upstream
        peer = up.transport.get_extra_info("peername") if up and up.transport else None
        if isinstance(peer, tuple):
            self.address = str(peer[0])
        if self.socks is not None:
            bound = up.transport.get_extra_info("sockname") if up and up.transport else None
            addr = (str(bound[0]), int(bound[1])) if isinstance(bound, tuple) else None
            self._send(socks5.reply(socks5.SUCCEEDED, addr))
        else:
            self._send(httpconnect.response(200))

    def closing(self, action: str, reason: str) -> None:
        """The connection ends: the client's refusal if it has no reply yet."""
        if self.auth_task is not None:
            self.auth_task.cancel()
            self.auth_task = None
        if reason == "egress_timeout" and not self.replied:
            self._timed_out()
        if not self.done and not self.replied and reason == "client_closed":
            self._count("truncated")
        if self.done and not self.replied:
            self.replied = True
            self._send(self._failure(action, reason))
        self.conn = None  # no cycle with the connection

    def _failure(self, action: str, reason: str) -> bytes:
        host = self.host or ""
        where = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        code = _errno_of(reason, self.errno)
        if action == "deny":
            why = (f"{host} resolves to no address the rules allow" if reason ==
                   "denied_resolved_address" else f"CONNECT to {where} is not allowed")
            return (socks5.reply(socks5.NOT_ALLOWED) if self.socks is not None else
                    httpconnect.response(403, why))
        if self.socks is not None:
            return socks5.reply(_SOCKS_ERRNO.get(code or 0, socks5.GENERAL_FAILURE))
        if code == errno.ETIMEDOUT:
            return httpconnect.response(504, f"connecting to {where} timed out")
        what = {"upstream_resolve_failed": f"cannot resolve {self.host}"}.get(
            reason, f"cannot connect to {where}")
        return httpconnect.response(502, what)

    def _timed_out(self) -> None:
        """egress.request_timeout passed (the core's timer): the refusal, if any."""
        self.replied = True
        self._count("timeout")
        if self.http is not None:
            message = f"no complete request within {self.rt.cfg.request_timeout:g} s"
            self._send(httpconnect.response(408, message))

    def _refuse(self, reason: str, message: str, reply: bytes | None) -> None:
        conn = self.conn
        self.replied = True
        self._count(reason)
        if reply is not None:
            self._send(reply)
        if conn is not None:
            conn.refuse(f"egress_{reason}", f"{self.rt.protocol}: {message}")

    def _count(self, reason: str) -> None:
        self.rt.errors.labels(listener=self.rt.listener, protocol=self.rt.protocol,
                              reason=reason).inc()

    def _send(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.client.send(data)

    def record(self) -> dict[str, Any]:
        """The flow record's ``egress`` object."""
        return {"protocol": self.rt.protocol, "host": self.host, "port": self.port,
                "user": self.user}


def _errno_of(reason: str, code: int | None) -> int | None:
    if reason == "upstream_resolve_failed":
        return errno.EHOSTUNREACH
    if reason == "upstream_connect_timeout":
        return errno.ETIMEDOUT
    return code

