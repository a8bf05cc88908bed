"""The config of ``tls.mode: passthrough`` listeners (SNI routing without terminating TLS).

    listeners:
      - name: edge
        listen: 0.0.0.0:443
        tls:
          mode: passthrough
          routes:                                   # most specific first: exact, then *.
            - {server_names: [api.example.com], upstream: api}
            - {server_names: ["*.apps.example.com"], upstream: apps}
          strict_sni: false   # true: no default route; unknown names and no SNI refused
        upstream: fallback    # the default route (leave it out with strict_sni: true)
        ruleset: edge

``routes(node)`` parses ``tls.routes``; ``listener_problems(...)`` reports the keys that do
not fit passthrough (material, client_auth ...), the default-route / ``strict_sni`` pairing
and ``transparent``; ``route_reference_problems(...)`` the routes' upstreams (known, with
``tls.mode: off``: the client's TLS goes to them untouched). Every problem names its key
path, like the rest of the loader. ``SniRouter`` is the routing itself (pure), used by the
data plane and by policy replay.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, Generic, TypeVar

from enforcer.config.model import ListenerTlsConfig, SniRouteConfig, UpstreamConfig
from enforcer.config.reader import Node
from enforcer.config.rulesets import dns_glob_problem, normalize_dns

T = TypeVar("T")
DEFAULT_ROUTE: Final = "default"  # the route label of the listener's upstream
ROUTE_KEYS = ("server_names", "upstream")
# listener tls keys that belong to terminating modes (passthrough never sees inside TLS)
TERMINATING_KEYS = ("material", "client_auth", "server_names", "alpn",
                    "allow_eof_without_close_notify")


def routes(node: Node, mode: str) -> tuple[SniRouteConfig, ...]:
    """``tls.routes``: a list of ``{server_names, upstream}``; a name in one route only."""
    if node.is_null:
        return ()
    if mode != "passthrough":
        node.error("goes with mode passthrough (routing by SNI without terminating TLS)")
        return ()
    out: list[SniRouteConfig] = []
    owner: dict[str, int] = {}
    items = node.list()
    if not items and isinstance(node.value, list):
        node.error("needs at least one route ({server_names: [...], upstream: NAME}), or "
                   "leave it out to send every connection to the listener's upstream")
    for i, item in enumerate(items):
        if not item.keys(ROUTE_KEYS):
            continue
        names = _server_names(item["server_names"], owner, i)
        upstream = item["upstream"].required_str()
        out.append(SniRouteConfig(names, upstream))
    return tuple(out)


def _server_names(node: Node, owner: dict[str, int], route: int) -> tuple[str, ...]:
    names: list[str] = []
    if node.is_null:
        node.error("is required (exact host names, or *.example.com for one label more)")
        return ()
    values = node.list(allow_scalar=True)
    if not values:
        node.error("needs at least one name")
    for item in values:
        text = item.str(None)
        if text is None:
            continue
        name = normalize_dns(text)
        problem = dns_glob_problem(name) if name else "is empty"
        if problem is not None:
            item.error(f"bad server name {text!r}: {problem}")
            continue
        if name in owner:
            where = "this route" if owner[name] == route else f"routes[{owner[name]}]"
            item.error(f"{name} is already in {where} (each name routes to one upstream)")
            continue
        owner[name] = route
        names.append(name)
    return tuple(names)


def listener_problems(item: Node, tls: ListenerTlsConfig) -> None:
    """A passthrough listener's keys that cannot apply, and its default route."""
    node = item["tls"]
    for key in TERMINATING_KEYS:
        if not node[key].is_null:
            node[key].error("does not apply to mode passthrough (TLS is not terminated: "
                            + ("use routes[].server_names" if key == "server_names"
                               else "the upstream terminates it") + ")")
    has_default = not item["upstream"].is_null
    if tls.strict_sni and has_default:
        item["upstream"].error("is the default route, but tls.strict_sni refuses every "
                               "name no route matches: keep one or the other")
    elif not tls.strict_sni and not has_default:
        item["upstream"].error("is required: the default route for names no route "
                               "matches (or set tls.strict_sni: true to refuse them)")
    if tls.strict_sni and not tls.routes:
        node["strict_sni"].error("needs routes (the names to accept)")
    if item["transparent"].value is True:
        item["transparent"].error("does not go with tls mode passthrough (it routes by "
                                  "SNI, not to the original destination)")


def route_reference_problems(item: Node, tls: ListenerTlsConfig,
                             upstreams: Mapping[str, UpstreamConfig],
                             defined: Sequence[str]) -> None:
    """Every route names a defined upstream that takes the TLS bytes as they are."""
    known = ", ".join(sorted(upstreams)) or "none"
    for i, route in enumerate(tls.routes):
        where = item["tls"]["routes"][i]["upstream"]
        up = upstreams.get(route.upstream)
        if up is None:
            if route.upstream and route.upstream not in defined:
                where.error(f"unknown upstream {route.upstream!r} (known: {known})")
            continue
        _passthrough_upstream(where, up)
    default = upstreams.get(str(item["upstream"].value)) if not item["upstream"].is_null \
        else None
    if default is not None:
        _passthrough_upstream(item["upstream"], default)


def _passthrough_upstream(where: Node, up: UpstreamConfig) -> None:
    if up.tls.mode != "off":
        where.error(f"upstream {up.name!r} has tls mode {up.tls.mode}: a passthrough "
                    "listener relays the client's TLS untouched, so its upstreams need "
                    "tls: {mode: off} (the backend terminates TLS)")
    if up.address.original:
        where.error(f"upstream {up.name!r} has address original_destination: a "
                    "passthrough listener routes by SNI")


class SniRouter(Generic[T]):
    """Server name -> (route label, upstream). Exact names win over ``*.`` names; ``T`` is
    what an upstream is to the caller (the data plane's runtime, replay's config)."""

    __slots__ = ("default", "exact", "wildcard")

    def __init__(self, routes: tuple[SniRouteConfig, ...],
                 upstreams: Mapping[str, T],
                 default: T | None) -> None:
        self.exact: dict[str, tuple[str, T]] = {}
        self.wildcard: dict[str, tuple[str, T]] = {}  # by the part after *.
        self.default = default
        for route in routes:
            up = upstreams[route.upstream]
            for name in route.server_names:
                if name.startswith("*."):
                    self.wildcard[name[2:]] = (name, up)
                else:
                    self.exact[name] = (name, up)

    def route(self, sni: str | None) -> tuple[str, T] | None:
        """``sni`` is lower case without a trailing dot (as ``clienthello`` gives it)."""
        if sni is not None:
            hit = self.exact.get(sni)
            if hit is not None:
                return hit
            head, _, rest = sni.partition(".")
            if head and rest:
                hit = self.wildcard.get(rest)
                if hit is not None:
                    return hit
        if self.default is None:
            return None
        return DEFAULT_ROUTE, self.default
