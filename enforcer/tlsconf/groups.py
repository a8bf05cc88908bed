"""TLS key-exchange groups: which ones a context offers (``tls.<name>.groups``), and which
one a handshake negotiated (the flow record's ``tls.group`` and ``upstream.group``).

Python's ``ssl`` (3.11) can do neither (``set_ecdh_curve`` sets one curve, for TLS 1.2).
OpenSSL's API for both is public and documented: ``SSL_CTX_set1_groups_list`` and
``SSL_get_negotiated_group`` are macros over ``SSL_CTX_ctrl`` / ``SSL_ctrl``
(``SSL_CTRL_SET_GROUPS_LIST``, ``SSL_CTRL_GET_NEGOTIATED_GROUP``, OpenSSL 3.0+), and
``SSL_group_to_name`` names a group (3.0+). ``OpenSSLGroups`` calls them with ctypes, in the
very libssl the ``_ssl`` module loaded (``dlopen`` of ``_ssl``'s own file with
``RTLD_NOLOAD``: its symbols resolve through ``_ssl``'s dependencies), so Python's ssl and
these calls always share one library. Once the native extension is bound, a connection's
group is read by it instead (``_pump.negotiated_group``: the same public calls on an SSL
verified the same way, without five ctypes round trips; ``tlsengine`` falls back here).

The ``SSL_CTX``/``SSL`` pointers are the leading fields of CPython's ``_ssl`` objects (the
layout ``_pump.c`` relies on too, unchanged since 3.7). They are never used before a
public call confirms them: an SSL pointer read from an ``SSLObject`` must be the SSL whose
``SSL_get_rbio`` is the BIO read from its incoming ``MemoryBIO`` (two independent reads
that only agree if the layout is the expected one), and a context's pointer must be what
``SSL_get_SSL_CTX`` returns for such a verified SSL made from that context. Any mismatch
makes the binding unavailable (explicit ``groups`` are then refused at startup, fail closed,
and records say ``group: null``), never a guess.

Which groups (``plan_groups``, pure): without ``groups`` in the config, an OpenSSL that
offers ``X25519MLKEM768`` (3.5 and later) gets ``DEFAULT_HYBRID``, hybrid post-quantum
first, as Go (ghostunnel) and BoringSSL (Envoy) now do; an older one keeps OpenSSL's own
default and the log says hybrid groups are unavailable. With ``groups``, the names are
probed one by one on a throwaway context: a name OpenSSL does not know is an error, except
the hybrid/ML-KEM names, which an older OpenSSL just leaves out (with a warning), so one
config fits a fleet on mixed OpenSSL versions.
"""

from __future__ import annotations

import _ssl
import ctypes
import functools
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("enforcer.tls")

_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_GET_NEGOTIATED_GROUP = 134
_TLSEXT_NID_UNKNOWN = 0x1000000

# Hybrid and post-quantum groups (OpenSSL 3.5+ names); an OpenSSL without them drops them.
HYBRID_GROUPS = ("X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024", "MLKEM512",
                 "MLKEM768", "MLKEM1024")
PREFERRED_HYBRID = "X25519MLKEM768"
# The default where the hybrid is offered: Go's order (crypto/tls, ghostunnel).
DEFAULT_HYBRID = ("X25519MLKEM768", "X25519", "P-256", "P-384", "P-521")
_HYBRID = frozenset(g.lower() for g in HYBRID_GROUPS)

_HEAD = object.__basicsize__  # PyObject_HEAD: the first field of an _ssl object follows it
_PTR = ctypes.sizeof(ctypes.c_void_p)

Triple = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]


class GroupsUnavailable(RuntimeError):
    """The binding cannot be used here (the message says why)."""


def _field(obj: object, offset: int) -> int:
    """The pointer-sized field at ``offset`` of a live object (0 for NULL)."""
    return ctypes.c_void_p.from_address(id(obj) + offset).value or 0


class OpenSSLGroups:
    """ctypes calls into the ``_ssl`` module's libssl. See the module comment."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(_ssl.__file__, mode=os.RTLD_NOW | os.RTLD_NOLOAD)
        vp, c_int, c_long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self._ctx_ctrl = _fn(lib, "SSL_CTX_ctrl", c_long, vp, c_int, c_long, vp)
        self._ctrl = _fn(lib, "SSL_ctrl", c_long, vp, c_int, c_long, vp)
        self._group_to_name = _fn(lib, "SSL_group_to_name", ctypes.c_char_p, vp, c_int)
        self._get_rbio = _fn(lib, "SSL_get_rbio", vp, vp)
        self._get_ctx = _fn(lib, "SSL_get_SSL_CTX", vp, vp)
        self._get_session = _fn(lib, "SSL_get_session", vp, vp)
        self._init_finished = _fn(lib, "SSL_is_init_finished", c_int, vp)
        self._err_get = _fn(lib, "ERR_get_error", ctypes.c_ulong)
        self._err_reason = _fn(lib, "ERR_reason_error_string", ctypes.c_char_p, ctypes.c_ulong)
        self._err_clear = _fn(lib, "ERR_clear_error", None)
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._ctx_of(probe)  # the layout check, once, before anything else is called

    # -- pointers, verified -------------------------------------------------------------
    def _ssl_of(self, triple: Triple) -> int:
        obj, incoming, _outgoing = triple
        inner = obj._sslobj  # type: ignore[attr-defined]  # the _ssl._SSLSocket
        if type(inner).__name__ != "_SSLSocket" or type(incoming) is not ssl.MemoryBIO:
            raise GroupsUnavailable("unexpected _ssl object types")
        ptr = _field(inner, _HEAD + _PTR)  # after PyObject *Socket
        bio = _field(incoming, _HEAD)
        if not ptr or not bio or self._get_rbio(ptr) != bio:
            raise GroupsUnavailable("the _ssl object layout is not the expected one")
        return ptr

    def _ctx_of(self, ctx: ssl.SSLContext) -> int:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = ctx.protocol == ssl.PROTOCOL_TLS_SERVER
        sample = ctx.wrap_bio(incoming, outgoing, server_side=server,
                              server_hostname=None if server else "groups.check")
        ssl_ptr = self._ssl_of((sample, incoming, outgoing))
        ptr = _field(ctx, _HEAD)
        if not ptr or self._get_ctx(ssl_ptr) != ptr:
            raise GroupsUnavailable("the _ssl context layout is not the expected one")
        return ptr

    # -- the calls --------------------------------------------------------------------------
    def set_groups(self, ctx: ssl.SSLContext, groups: tuple[str, ...]) -> None:
        """Offer ``groups`` (preference order) on ``ctx``; ValueError with OpenSSL's reason
        if it refuses the list."""
        ptr = self._ctx_of(ctx)
        self._err_clear()
        if self._ctx_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, ":".join(groups).encode()) != 1:
            raise ValueError(self._error() or "OpenSSL refused the list")

    def offers(self, name: str) -> bool:
        """Whether this OpenSSL accepts ``name`` as a group (on a throwaway context)."""
        try:
            self.set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), (name,))
        except ValueError:
            return False
        return True

    def negotiated(self, triple: Triple) -> str | None:
        """The group the handshake of this (SSLObject, in, out) used; None before one or
        without a key exchange (a TLS 1.3 PSK-only resumption reports the original)."""
        ptr = self._ssl_of(triple)
        # OpenSSL 3.0 reads the session's group without checking there is a session yet
        if self._init_finished(ptr) != 1 or not self._get_session(ptr):
            return None
        nid = self._ctrl(ptr, _SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)
        if nid <= 0:
            return None
        name = self._group_to_name(ptr, nid)
        if name:
            return str(name.decode("ascii", "replace"))
        return f"0x{nid & 0xFFFF:04x}" if nid & _TLSEXT_NID_UNKNOWN else None

    def _error(self) -> str | None:
        code = self._err_get()
        self._err_clear()
        if not code:
            return None
        reason = self._err_reason(code)
        return reason.decode("ascii", "replace") if reason else f"error {code:#x}"


def _fn(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
    try:
        f = getattr(lib, name)
    except AttributeError:
        raise GroupsUnavailable(f"{name} is not in the OpenSSL the ssl module uses "
                                f"({ssl.OPENSSL_VERSION}; 3.0 or later is needed)") from None
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


@functools.cache
def _bound() -> tuple[OpenSSLGroups | None, str]:
    try:
        return OpenSSLGroups(), ""
    except (GroupsUnavailable, OSError, AttributeError, ValueError) as exc:
        return None, str(exc)


def binding() -> OpenSSLGroups | None:
    """The verified binding (made on first use), or None: see ``unavailable_reason``."""
    return _bound()[0]


def unavailable_reason() -> str:
    return _bound()[1]


def negotiated(triple: Triple) -> str | None:
    """The negotiated group's name, or None (no binding, no handshake, no key exchange)."""
    b = binding()
    if b is None:
        return None
    try:
        return b.negotiated(triple)
    except (GroupsUnavailable, AttributeError, ValueError):
        return None


@functools.cache
def offers(name: str) -> bool:
    b = binding()
    return b is not None and b.offers(name)


def hybrid_available() -> bool:
    return offers(PREFERRED_HYBRID)


# ---------------------------------------------------------------------------- choosing
@dataclass(frozen=True, slots=True)
class GroupPlan:
    groups: tuple[str, ...] | None  # to set; None: leave OpenSSL's default
    dropped: tuple[str, ...] = ()  # hybrid names this OpenSSL lacks (configured, left out)
    problems: tuple[tuple[int | None, str], ...] = ()  # (list index or None, message)


def plan_groups(configured: tuple[str, ...] | None, offered: Callable[[str], bool],
                version: str = ssl.OPENSSL_VERSION) -> GroupPlan:
    """What to set for a material's ``groups`` (None: not configured). Pure."""
    if configured is None:
        if offered(PREFERRED_HYBRID):
            return GroupPlan(tuple(g for g in DEFAULT_HYBRID if offered(g)))
        return GroupPlan(None)
    keep: list[str] = []
    dropped: list[str] = []
    problems: list[tuple[int | None, str]] = []
    for i, name in enumerate(configured):
        if offered(name):
            keep.append(name)
        elif name.lower() in _HYBRID:
            dropped.append(name)
        else:
            problems.append((i, f"{version} does not offer the group {name!r} (`openssl list "
                                "-tls-groups` lists those it does)"))
    if not keep and not problems:
        problems.append((None, f"none of these groups is offered by {version} (hybrid "
                               "post-quantum groups need OpenSSL 3.5 or later)"))
    return GroupPlan(tuple(keep), tuple(dropped), tuple(problems))


# ---------------------------------------------------------------------------- applying
class GroupsError(ValueError):
    """``groups`` cannot be applied; one line per problem, each naming its key path."""


_logged: set[str] = set()


def _log_once(key: str, level: int, message: str, *args: object) -> None:
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)


def apply_groups(ctx: ssl.SSLContext, configured: tuple[str, ...] | None, key: str) -> None:
    """Set the groups ``plan_groups`` chooses on ``ctx`` (built at startup, on reloads and
    key rotations); ``key`` is the config path for messages (``tls.mesh.groups``)."""
    b = binding()
    if b is None:
        if configured is not None:
            raise GroupsError(f"{key}: cannot be set with this Python's ssl module: "
                              f"{unavailable_reason()}")
        _log_once("unbound", logging.WARNING, "TLS key-exchange groups cannot be read or set "
                  "(%s): OpenSSL's default groups are offered and flow records carry "
                  "group: null", unavailable_reason())
        return
    plan = plan_groups(configured, offers)
    if plan.problems:
        raise GroupsError("\n".join(f"{key}[{i}]: {msg}" if i is not None else f"{key}: {msg}"
                                    for i, msg in plan.problems))
    if plan.dropped:
        _log_once(key, logging.WARNING, "%s: %s left out: hybrid post-quantum groups are "
                  "unavailable with %s (they need OpenSSL 3.5 or later); offering %s", key,
                  ", ".join(plan.dropped), ssl.OPENSSL_VERSION, ", ".join(plan.groups or ()))
    elif configured is None and plan.groups is None:
        _log_once("no-hybrid", logging.INFO, "hybrid post-quantum key exchange (%s) is "
                  "unavailable with %s (it needs OpenSSL 3.5 or later): OpenSSL's default "
                  "groups are offered", PREFERRED_HYBRID, ssl.OPENSSL_VERSION)
    if plan.groups is None:
        return
    try:
        b.set_groups(ctx, plan.groups)
    except (ValueError, GroupsUnavailable) as exc:
        raise GroupsError(f"{key}: OpenSSL refused {':'.join(plan.groups)}: {exc}") from None
