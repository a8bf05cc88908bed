"""Metrics: exposed names, types and label sets are exactly the docs/design.md contract."""

from __future__ import annotations

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from enforcer.observe import metrics as metrics_mod
from enforcer.observe.metrics import Metrics, NullMetrics

# Written out on purpose (not imported): this is the contract of docs/design.md.
DESIGN: dict[str, tuple[str, frozenset[str]]] = {
    "enforcer_connections_total": ("counter", frozenset({"listener", "action"})),
    "enforcer_connections_active": ("gauge", frozenset({"listener"})),
    "enforcer_bytes_total": ("counter", frozenset({"listener", "direction"})),
    "enforcer_tls_handshake_seconds": ("histogram", frozenset({"listener", "side"})),
    "enforcer_tls_handshake_errors_total": ("counter", frozenset({"listener", "reason"})),
    "enforcer_policy_decisions_total": (
        "counter", frozenset({"listener", "ruleset", "rule", "action"})),
    "enforcer_proxy_protocol_errors_total": ("counter", frozenset({"listener", "reason"})),
    "enforcer_upstream_connect_seconds": ("histogram", frozenset({"upstream"})),
    "enforcer_upstream_errors_total": ("counter", frozenset({"upstream", "reason"})),
    "enforcer_connection_duration_seconds": ("histogram", frozenset({"listener"})),
    "enforcer_certificate_expiry_timestamp_seconds": ("gauge", frozenset({"material"})),
    "enforcer_reloads_total": ("counter", frozenset({"kind", "result"})),
    "enforcer_flowlog_dropped_total": ("counter", frozenset()),
    # handshakes by negotiated key-exchange group (docs/design.md, the contract)
    "enforcer_tls_groups_total": ("counter", frozenset({"listener", "side", "group"})),
    # mesh listeners' connections by how they came (docs/design.md, the contract)
    "enforcer_mesh_connections_total": ("counter", frozenset({"listener", "mode"})),
    # passthrough listeners' connections by the upstream their SNI routed them to
    "enforcer_passthrough_routed_total": ("counter", frozenset({"listener", "upstream"})),
    "enforcer_limited_total": ("counter", frozenset({"listener", "reason"})),
    "enforcer_certificate_closes_total": ("counter", frozenset({"listener", "reason"})),
    "enforcer_egress_handshake_errors_total": ("counter",
                                               frozenset({"listener", "protocol", "reason"})),
}

ATTRS = [name.removeprefix("enforcer_") for name in DESIGN]


def observe_everything(m: Metrics | NullMetrics) -> None:
    m.connections_total.labels(listener="in", action="allow").inc()
    m.connections_active.labels(listener="in").inc()
    m.bytes_total.labels(listener="in", direction="from_client").inc(100)
    m.tls_handshake_seconds.labels(listener="in", side="server").observe(0.002)
    m.tls_handshake_errors_total.labels(listener="in", reason="unknown_ca").inc()
    m.policy_decisions_total.labels(listener="in", ruleset="rs", rule="r1",
                                    action="allow").inc()
    m.proxy_protocol_errors_total.labels(listener="in", reason="untrusted").inc()
    m.upstream_connect_seconds.labels(upstream="app").observe(0.0003)
    m.upstream_errors_total.labels(upstream="app", reason="refused").inc()
    m.connection_duration_seconds.labels(listener="in").observe(12.5)
    m.certificate_expiry_timestamp_seconds.labels(material="mesh").set(1.8e9)
    m.reloads_total.labels(kind="tls", result="ok").inc()
    m.flowlog_dropped_total.inc()
    m.tls_groups_total.labels(listener="in", side="server", group="x25519").inc()
    m.mesh_connections_total.labels(listener="in", mode="mtls").inc()
    m.passthrough_routed_total.labels(listener="in", upstream="app").inc()
    m.limited_total.labels(listener="in", reason="rate_limited").inc()
    m.certificate_closes_total.labels(listener="in", reason="revoked").inc()
    m.egress_handshake_errors_total.labels(listener="in", protocol="socks5",
                                           reason="timeout").inc()


def exposed_name(family_name: str, family_type: str) -> str:
    return family_name + "_total" if family_type == "counter" else family_name


def sample_labelsets(family: object) -> set[frozenset[str]]:
    out: set[frozenset[str]] = set()
    for sample in family.samples:  # type: ignore[attr-defined]
        out.add(frozenset(k for k in sample.labels if k != "le"))
    return out


def test_text_exposition_matches_design_table() -> None:
    m = Metrics()
    observe_everything(m)
    body, ctype = m.render()
    assert ctype.startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(body.decode()))
    seen = {exposed_name(f.name, f.type): f for f in families}
    assert set(seen) == set(DESIGN)
    for name, (kind, labels) in DESIGN.items():
        family = seen[name]
        assert family.type == kind, name
        assert family.samples, f"{name} has no samples"
        assert sample_labelsets(family) == {labels}, name


def test_sample_values_and_names() -> None:
    m = Metrics()
    observe_everything(m)
    text = m.render()[0].decode()
    assert 'enforcer_connections_total{action="allow",listener="in"} 1.0' in text
    assert 'enforcer_bytes_total{direction="from_client",listener="in"} 100.0' in text
    assert "enforcer_flowlog_dropped_total 1.0" in text
    assert 'enforcer_tls_handshake_seconds_count{listener="in",side="server"} 1.0' in text
    assert 'enforcer_certificate_expiry_timestamp_seconds{material="mesh"} 1.8e+09' in text
    assert "_created" not in text


def test_openmetrics_exposition_parses_with_same_families() -> None:
    m = Metrics()
    observe_everything(m)
    body, ctype = m.render(openmetrics=True)
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    families = list(openmetrics_families(body.decode()))
    seen = {exposed_name(f.name, f.type): f for f in families}
    assert set(seen) == set(DESIGN)
    for name, (kind, labels) in DESIGN.items():
        assert seen[name].type == kind
        assert sample_labelsets(seen[name]) == {labels}
    assert b"_created" not in body


def test_render_for_negotiates_on_accept() -> None:
    m = Metrics()
    assert m.render_for(None)[1].startswith("text/plain")
    body, ctype = m.render_for("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_histogram_buckets_fit_what_they_measure() -> None:
    hs = metrics_mod.HANDSHAKE_BUCKETS
    assert hs[0] <= 0.0005 and hs[-1] >= 10
    up = metrics_mod.CONNECT_BUCKETS
    assert up[0] <= 0.0005 and up[-1] >= 10
    dur = metrics_mod.DURATION_BUCKETS
    assert dur[0] <= 0.001 and dur[-1] >= 4 * 3600
    for buckets in (hs, up, dur):
        assert list(buckets) == sorted(set(buckets))


def test_fresh_process_exposes_zero_series_per_listener() -> None:
    m = Metrics()
    m.register_listener("inbound")
    families = {f.name: f for f in text_string_to_metric_families(m.render()[0].decode())}
    conns = {(s.labels["listener"], s.labels["action"]): s.value
             for s in families["enforcer_connections"].samples}
    assert conns == {("inbound", a): 0.0 for a in ("allow", "deny", "error")}
    active = [(s.labels, s.value) for s in families["enforcer_connections_active"].samples]
    assert active == [({"listener": "inbound"}, 0.0)]
    directions = {s.labels["direction"] for s in families["enforcer_bytes"].samples}
    assert directions == {"from_client", "to_client"}
    reloads = {(s.labels["kind"], s.labels["result"]) for s in families["enforcer_reloads"].samples}
    assert reloads == {("tls", "ok"), ("tls", "error"), ("rulesets", "ok"), ("rulesets", "error")}


def test_instances_have_separate_registries() -> None:
    a, b = Metrics(), Metrics()
    a.flowlog_dropped_total.inc(5)
    assert "enforcer_flowlog_dropped_total 0.0" in b.render()[0].decode()
    assert "enforcer_flowlog_dropped_total 5.0" in a.render()[0].decode()


def test_cached_children_are_the_same_series() -> None:
    m = Metrics()
    child = m.bytes_total.labels(listener="in", direction="to_client")
    for _ in range(3):
        child.inc(10)
    m.bytes_total.labels(listener="in", direction="to_client").inc(1)
    assert 'enforcer_bytes_total{direction="to_client",listener="in"} 31.0' in m.render()[0].decode()


def test_null_metrics_has_the_same_attributes() -> None:
    real, null = Metrics(), NullMetrics()
    public = {n for n in dir(real) if not n.startswith("_")}
    assert public == {n for n in dir(null) if not n.startswith("_")}
    for attr in ATTRS:
        assert hasattr(real, attr) and hasattr(null, attr), attr


def test_null_metrics_accepts_every_call_and_checks_label_names() -> None:
    null = NullMetrics()
    observe_everything(null)
    child = null.connections_active.labels(listener="x")
    child.inc()
    child.dec()
    child.set(3)
    null.tls_handshake_seconds.labels("in", "server").observe(1.0)
    null.register_listener("in")
    null.certificate_expiry_timestamp_seconds.remove("mesh")
    try:
        null.connections_total.labels(listener="x")
    except ValueError:
        pass
    else:
        raise AssertionError("missing label accepted")
    assert null.render()[0] == b""


def test_real_metrics_reject_wrong_labels_too() -> None:
    m = Metrics()
    try:
        m.connections_total.labels(listener="x", verdict="allow")
    except ValueError:
        return
    raise AssertionError("wrong label name accepted")
