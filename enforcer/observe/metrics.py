"""Prometheus metrics: one object holding every metric of the table in docs/observability.md
(the contract of docs/design.md).

``Metrics`` owns a private ``CollectorRegistry`` (never prometheus-client's global one), so
tests and several instances in one process never collide. The data plane gets the object
passed in and does ``metrics.connections_total.labels(listener=..., action=...).inc()``;
hot paths may cache the ``.labels(...)`` child per listener (children are thread-safe).

``NullMetrics`` has the same attributes; each is a ``NullMetric`` whose ``labels()`` checks
the label names (so a typo still fails in tests) and returns a shared no-op child. Use it in
tests that do not look at metrics and in benchmarks that want the bare data path.

Counters are declared with their full exposed name (``enforcer_connections_total``);
prometheus-client strips and re-adds the ``_total`` suffix, so the exposition shows exactly
the documented names. The library's ``<name>_created`` samples (one extra series per counter
and histogram child) are left out of the exposition, as HAProxy and Envoy users expect; this
is done per registry at render time, not through the library's process-global switch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder, generate_latest
from prometheus_client.openmetrics import exposition as om_exposition

ACTIONS: Final = ("allow", "deny", "error")
DIRECTIONS: Final = ("from_client", "to_client")
RELOAD_KINDS: Final = ("tls", "rulesets")
RELOAD_RESULTS: Final = ("ok", "error")

# TLS handshakes: ~0.3 ms resumed on loopback up to the 10 s default handshake_timeout.
HANDSHAKE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                            0.5, 1.0, 2.5, 5.0, 10.0)
# TCP connect: ~50 µs on loopback up to the 5 s default connect_timeout (10 s headroom).
CONNECT_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                          0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Whole connections: 1 ms request/response up to 4 h streams (idle_timeout defaults to 1 h).
DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0,
                           300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)

# name -> (kind, help, labels, buckets). The docs/design.md contract: extend, never rename.
SPEC: Final[dict[str, tuple[str, str, tuple[str, ...], tuple[float, ...]]]] = {
    "connections_total": (
        "counter", "Connections closed, by final action.", ("listener", "action"), ()),
    "connections_active": (
        "gauge", "Connections currently open.", ("listener",), ()),
    "bytes_total": (
        "counter", "Bytes relayed, by direction.", ("listener", "direction"), ()),
    "tls_handshake_seconds": (
        "histogram", "TLS handshake duration; side=server for accepted connections, "
        "client for upstream ones.", ("listener", "side"), HANDSHAKE_BUCKETS),
    "tls_groups_total": (
        "counter", "Completed TLS handshakes by negotiated key-exchange group (x25519, "
        "secp256r1, X25519MLKEM768 ...); side as for tls_handshake_seconds.",
        ("listener", "side", "group"), ()),
    "tls_handshake_errors_total": (
        "counter", "Failed TLS handshakes, by reason.", ("listener", "reason"), ()),
    "policy_decisions_total": (
        "counter", "Policy decisions, by ruleset, rule and action.",
        ("listener", "ruleset", "rule", "action"), ()),
    "proxy_protocol_errors_total": (
        "counter", "Connections dropped for a bad or untrusted PROXY header.",
        ("listener", "reason"), ()),
    "egress_handshake_errors_total": (
        "counter", "Egress requests (SOCKS5, HTTP CONNECT) refused before policy, by reason.",
        ("listener", "protocol", "reason"), ()),
    "upstream_connect_seconds": (
        "histogram", "Time to connect to an upstream (TCP).", ("upstream",), CONNECT_BUCKETS),
    "upstream_errors_total": (
        "counter", "Upstream connect or TLS failures, by reason.", ("upstream", "reason"), ()),
    "connection_duration_seconds": (
        "histogram", "Connection lifetime from accept to close.", ("listener",),
        DURATION_BUCKETS),
    "certificate_expiry_timestamp_seconds": (
        "gauge", "not_after of the leaf certificate of each TLS material (Unix time).",
        ("material",), ()),
    "reloads_total": (
        "counter", "Reloads, by kind and result.", ("kind", "result"), ()),
    "flowlog_dropped_total": (
        "counter", "Flow records dropped (queue full or sink failing).", (), ()),
    "mesh_connections_total": (
        "counter", "Connections on mesh listeners, by how they came or went: mtls, tls, "
        "plaintext (inbound), external, external_denied (outbound).", ("listener", "mode"),
        ()),
    "passthrough_routed_total": (
        "counter", "Connections a tls.mode passthrough listener routed by SNI, by the "
        "upstream chosen.", ("listener", "upstream"), ()),
    "limited_total": (
        "counter", "Connections refused by a rule's limits before any upstream connect: "
        "rate_limited or concurrency_limited.", ("listener", "reason"), ()),
    "certificate_closes_total": (
        "counter", "Open connections closed because their client certificate was revoked "
        "by a reloaded CRL (revoked) or expired (peer_certificate_expired).",
        ("listener", "reason"), ()),
}

PREFIX: Final = "enforcer_"


def _make(name: str, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
    kind, doc, labels, buckets = SPEC[name]
    full = PREFIX + name
    if kind == "counter":
        return Counter(full, doc, labels, registry=registry)
    if kind == "gauge":
        # With workers (prometheus multiprocess mode) gauges are combined across processes:
        # open connections add up over live workers; an expiry time is the same everywhere.
        mode: Literal["livesum", "max"] = "livesum" if name == "connections_active" else "max"
        return Gauge(full, doc, labels, registry=registry, multiprocess_mode=mode)
    return Histogram(full, doc, labels, registry=registry, buckets=buckets)


class Metrics:
    """Every enforcer metric, registered in its own registry."""

    connections_total: Counter
    connections_active: Gauge
    bytes_total: Counter
    tls_handshake_seconds: Histogram
    tls_groups_total: Counter
    tls_handshake_errors_total: Counter
    policy_decisions_total: Counter
    proxy_protocol_errors_total: Counter
    egress_handshake_errors_total: Counter
    upstream_connect_seconds: Histogram
    upstream_errors_total: Counter
    connection_duration_seconds: Histogram
    certificate_expiry_timestamp_seconds: Gauge
    reloads_total: Counter
    flowlog_dropped_total: Counter
    mesh_connections_total: Counter
    passthrough_routed_total: Counter
    limited_total: Counter
    certificate_closes_total: Counter

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        for name in SPEC:
            setattr(self, name, _make(name, self.registry))
        for kind in RELOAD_KINDS:
            for result in RELOAD_RESULTS:
                self.reloads_total.labels(kind=kind, result=result)

    def register_listener(self, name: str) -> None:
        """Create the listener's zero-valued series, so dashboards see it from the start."""
        self.connections_active.labels(listener=name)
        for action in ACTIONS:
            self.connections_total.labels(listener=name, action=action)
        for direction in DIRECTIONS:
            self.bytes_total.labels(listener=name, direction=direction)

    def render(self, openmetrics: bool = False) -> tuple[bytes, str]:
        """The exposition (body, content type): Prometheus text 0.0.4 or OpenMetrics 1.0."""
        return render(self.registry, openmetrics)

    def render_for(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition negotiated from an HTTP ``Accept`` header."""
        return render_for(self.registry, accept)


class AggregatedMetrics:
    """The supervisor's view when ``workers`` > 1: every worker's metrics, summed.

    Workers write their samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's
    multiprocess mode, chosen before the library is imported); this reads them all.
    """

    def __init__(self, path: str) -> None:
        from prometheus_client import multiprocess

        self.registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(self.registry, path=path)  # type: ignore[no-untyped-call]

    def render(self, openmetrics: bool = False) -> tuple[bytes, str]:
        return render(self.registry, openmetrics)

    def render_for(self, accept: str | None) -> tuple[bytes, str]:
        return render_for(self.registry, accept)


class _WithoutCreated:
    """A view of a registry without the ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def render(registry: CollectorRegistry, openmetrics: bool = False) -> tuple[bytes, str]:
    view = _WithoutCreated(registry)
    if openmetrics:
        body: bytes = om_exposition.generate_latest(view)  # type: ignore[no-untyped-call]
        return body, om_exposition.CONTENT_TYPE_LATEST
    return generate_latest(view), CONTENT_TYPE_PLAIN_0_0_4


def render_for(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept or "")
    return encoder(_WithoutCreated(registry)), content_type


class _NullChild:
    """Does nothing, whatever is called."""

    __slots__ = ()

    def inc(self, amount: float = 1, exemplar: Any = None) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float, exemplar: Any = None) -> None:
        pass

    def set_to_current_time(self) -> None:
        pass


_NULL_CHILD: Final = _NullChild()


class NullMetric(_NullChild):
    """A no-op metric that still rejects wrong label names, like prometheus-client."""

    __slots__ = ("_labelnames", "name")

    def __init__(self, name: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self._labelnames = frozenset(labelnames)

    def labels(self, *values: object, **kw: object) -> _NullChild:
        if values:
            if kw or len(values) != len(self._labelnames):
                raise ValueError(f"{self.name}: incorrect label count")
        elif kw.keys() != self._labelnames:
            raise ValueError(f"{self.name}: incorrect label names {sorted(kw)}")
        return _NULL_CHILD

    def remove(self, *values: object) -> None:
        pass

    def clear(self) -> None:
        pass


class NullMetrics:
    """Same attributes as ``Metrics``, all no-ops. For tests and benchmarks."""

    connections_total: NullMetric
    connections_active: NullMetric
    bytes_total: NullMetric
    tls_handshake_seconds: NullMetric
    tls_groups_total: NullMetric
    tls_handshake_errors_total: NullMetric
    policy_decisions_total: NullMetric
    proxy_protocol_errors_total: NullMetric
    egress_handshake_errors_total: NullMetric
    upstream_connect_seconds: NullMetric
    upstream_errors_total: NullMetric
    connection_duration_seconds: NullMetric
    certificate_expiry_timestamp_seconds: NullMetric
    reloads_total: NullMetric
    flowlog_dropped_total: NullMetric
    mesh_connections_total: NullMetric
    passthrough_routed_total: NullMetric
    limited_total: NullMetric
    certificate_closes_total: NullMetric

    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # stays empty: renders a valid empty exposition
        for name, (_kind, _doc, labels, _buckets) in SPEC.items():
            setattr(self, name, NullMetric(PREFIX + name, labels))

    def register_listener(self, name: str) -> None:
        pass

    def render(self, openmetrics: bool = False) -> tuple[bytes, str]:
        return render(self.registry, openmetrics)

    def render_for(self, accept: str | None) -> tuple[bytes, str]:
        return render_for(self.registry, accept)


AnyMetrics = Metrics | NullMetrics
