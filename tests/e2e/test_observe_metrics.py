"""Known traffic through real listeners, then exact metrics and flow records.

One in-process ``Server`` with its admin endpoint and a file flow log, three listeners
and an echo backend. Six connections, one at a time: an allowed mTLS client, a client the
policy denies by rule, a client without a certificate, an allowed plaintext client behind
a PROXY v2 header (with an AWS VPC endpoint TLV), garbage where a PROXY header must be, and
a client whose upstream refuses the connection. Then /metrics is scraped over HTTP, parsed
with prometheus-client's parser, and every series of every DESIGN.md metric is compared
with the exact expected value; and the file's six flow records are compared field by
field.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path
from typing import Any

from enforcer.observe.metrics import CONNECT_BUCKETS, DURATION_BUCKETS, HANDSHAKE_BUCKETS
from tests.conftest import Pki
from tests.e2e.harness import Backend, sha
from tests.e2e.observe_util import (
    Samples,
    admin_port,
    assert_record_shape,
    labels,
    listener_port,
    load_cert,
    proxy_v2,
    read_records,
    refused,
    sans,
    scrape,
    serving,
    spki_sha256,
    talk,
    tls_client_ctx,
    wait_until,
)

CLIENT_ID = "spiffe://enforcer.demo/ns/demo/sa/outbound"
INTRUDER_ID = "spiffe://enforcer.demo/ns/other/sa/intruder"
DESIGN_METRICS = {
    "enforcer_connections", "enforcer_connections_active", "enforcer_bytes",
    "enforcer_tls_handshake_seconds", "enforcer_tls_handshake_errors",
    "enforcer_policy_decisions", "enforcer_proxy_protocol_errors",
    "enforcer_upstream_connect_seconds", "enforcer_upstream_errors",
    "enforcer_connection_duration_seconds", "enforcer_certificate_expiry_timestamp_seconds",
    "enforcer_reloads", "enforcer_flowlog_dropped",
    "enforcer_tls_groups"}  # added after DESIGN.md (issue 26)


def closed_port() -> int:
    """A loopback port nobody listens on (connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(pki: Pki, app_port: int, dead_port: int, flows: Path) -> dict[str, Any]:
    return {
        "version": 1, "node": {"name": "obs-node"},
        "tls": {"mesh": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                         "ca": str(pki.ca)}},
        "listeners": [
            {"name": "mtls", "listen": "127.0.0.1:0", "ruleset": "mesh", "upstream": "app",
             "tls": {"mode": "terminate", "material": "mesh", "client_auth": "required"}},
            {"name": "pp", "listen": "127.0.0.1:0", "ruleset": "open", "upstream": "app",
             "tls": {"mode": "off"},
             "proxy_protocol": {"accept": "required", "trusted_sources": ["127.0.0.0/8"]}},
            {"name": "dead", "listen": "127.0.0.1:0", "ruleset": "open", "upstream": "gone",
             "tls": {"mode": "off"}},
        ],
        "upstreams": {"app": {"address": f"127.0.0.1:{app_port}"},
                      "gone": {"address": f"127.0.0.1:{dead_port}"}},
        "rulesets": {
            "mesh": {"default": "deny", "rules": [
                {"name": "outbound-may-call", "action": "allow",
                 "from": {"identities": [CLIENT_ID]}},
                {"name": "no-intruders", "action": "deny",
                 "from": {"identities": ["spiffe://enforcer.demo/ns/other/**"]}}]},
            "open": {"default": "allow"}},
        "flow_log": {"sink": f"file:{flows}"},
    }


async def test_known_traffic_gives_exact_metrics_and_flow_records(pki: Pki, tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    dead_port = closed_port()
    flows = tmp_path / "flows.jsonl"
    mtls_payload, pp_payload = os.urandom(300_000), os.urandom(70_000)
    try:
        async with serving(config(pki, backend.port, dead_port, flows)) as server:
            ports = {name: listener_port(server, name) for name in ("mtls", "pp", "dead")}
            ctx = tls_client_ctx(pki.ca, pki.client.cert, pki.client.key)
            allowed = await talk(ports["mtls"], mtls_payload, ssl_ctx=ctx,
                                 server_hostname="localhost")
            assert sha(allowed.received) == sha(mtls_payload)
            await wait_until(lambda: len(read_records(flows)) == 1)
            assert await refused(ports["mtls"], b"let me in", server_hostname="localhost",
                                 ssl_ctx=tls_client_ctx(pki.ca, pki.other.cert,
                                                        pki.other.key)) == b""
            await wait_until(lambda: len(read_records(flows)) == 2)
            assert await refused(ports["mtls"], b"no cert", ssl_ctx=tls_client_ctx(pki.ca),
                                 server_hostname="localhost") == b""
            await wait_until(lambda: len(read_records(flows)) == 3)
            header = proxy_v2(("203.0.113.7", 51234), ("10.0.9.9", 15006),
                              aws_vpce_id="vpce-0abc")
            proxied = await talk(ports["pp"], pp_payload, prefix=header)
            assert sha(proxied.received) == sha(pp_payload)
            await wait_until(lambda: len(read_records(flows)) == 4)
            assert await refused(ports["pp"], b"GARBAGE\r\n\r\nmore") == b""
            await wait_until(lambda: len(read_records(flows)) == 5)
            assert await refused(ports["dead"]) == b""
            await wait_until(lambda: len(read_records(flows)) == 6)

            samples = await scrape(admin_port(server))
            check_metrics(samples, pki, len(mtls_payload), len(pp_payload), dead_port)
        records = read_records(flows)
        assert len(records) == 6
        check_records(records, pki, ports, backend.port, dead_port, allowed.local_port,
                      proxied.local_port, allowed.tls_version, allowed.tls_cipher,
                      len(mtls_payload), len(pp_payload))
        assert backend.connections == 2, "only the two allowed flows reached the backend"
        assert sorted(backend.received, key=len) == [pp_payload, mtls_payload]
    finally:
        await backend.close()


def check_metrics(s: Samples, pki: Pki, mtls_bytes: int, pp_bytes: int,
                  dead_port: int) -> None:
    L = labels
    assert s["enforcer_connections_total"] == {
        L(listener="mtls", action="allow"): 1, L(listener="mtls", action="deny"): 1,
        L(listener="mtls", action="error"): 1,
        L(listener="pp", action="allow"): 1, L(listener="pp", action="deny"): 0,
        L(listener="pp", action="error"): 1,
        L(listener="dead", action="allow"): 0, L(listener="dead", action="deny"): 0,
        L(listener="dead", action="error"): 1}
    assert s["enforcer_connections_active"] == {
        L(listener="mtls"): 0, L(listener="pp"): 0, L(listener="dead"): 0}
    assert s["enforcer_bytes_total"] == {
        L(listener="mtls", direction="from_client"): mtls_bytes,
        L(listener="mtls", direction="to_client"): mtls_bytes,
        L(listener="pp", direction="from_client"): pp_bytes,
        L(listener="pp", direction="to_client"): pp_bytes,
        L(listener="dead", direction="from_client"): 0,
        L(listener="dead", direction="to_client"): 0}
    # the allowed and the denied client finished their handshakes; the third did not
    check_histogram(s, "enforcer_tls_handshake_seconds", HANDSHAKE_BUCKETS,
                    {L(listener="mtls", side="server"): 2})
    assert s["enforcer_tls_handshake_errors_total"] == {
        L(listener="mtls", reason="no_client_cert"): 1}
    assert s["enforcer_policy_decisions_total"] == {
        L(listener="mtls", ruleset="mesh", rule="outbound-may-call", action="allow"): 1,
        L(listener="mtls", ruleset="mesh", rule="no-intruders", action="deny"): 1,
        L(listener="pp", ruleset="open", rule="", action="allow"): 1,
        L(listener="dead", ruleset="open", rule="", action="allow"): 1}
    assert s["enforcer_proxy_protocol_errors_total"] == {
        L(listener="pp", reason="bad_signature"): 1}
    check_histogram(s, "enforcer_upstream_connect_seconds", CONNECT_BUCKETS,
                    {L(upstream="app"): 2})
    assert s["enforcer_upstream_errors_total"] == {
        L(upstream="gone", reason="econnrefused"): 1}
    check_histogram(s, "enforcer_connection_duration_seconds", DURATION_BUCKETS,
                    {L(listener="mtls"): 3, L(listener="pp"): 2, L(listener="dead"): 1})
    not_after = load_cert(pki.server.cert).not_valid_after_utc
    assert s["enforcer_certificate_expiry_timestamp_seconds"] == {
        L(material="mesh"): not_after.timestamp()}
    assert s["enforcer_reloads_total"] == {
        L(kind=k, result=r): 0 for k in ("tls", "rulesets") for r in ("ok", "error")}
    assert s["enforcer_flowlog_dropped_total"] == {L(): 0}
    names = {n.removesuffix(suffix) for n in s
             for suffix in ("_total", "_bucket", "_count", "_sum") if n.endswith(suffix)}
    names |= {n for n in s if not n.endswith(("_total", "_bucket", "_count", "_sum"))}
    assert names == DESIGN_METRICS, "exactly the DESIGN.md metrics, no *_created series"
    assert not any(n.endswith("_created") for n in s)


def check_histogram(s: Samples, name: str, buckets: tuple[float, ...],
                    counts: dict[frozenset[tuple[str, str]], int]) -> None:
    """Exact observation counts per label set; buckets are the declared ones, cumulative,
    ending in +Inf == count; the sum is positive for every observed series."""
    assert s[name + "_count"] == counts
    assert set(s[name + "_sum"]) == set(counts)
    for lbl, count in counts.items():
        assert s[name + "_sum"][lbl] > 0
        series = {float(dict(k)["le"]): v for k, v in s[name + "_bucket"].items()
                  if k - {("le", dict(k)["le"])} == lbl}
        assert sorted(series) == [*buckets, float("inf")]
        values = [series[le] for le in sorted(series)]
        assert values == sorted(values) and values[-1] == count
    assert len(s[name + "_bucket"]) == len(counts) * (len(buckets) + 1)


def check_records(records: list[dict[str, Any]], pki: Pki, ports: dict[str, int],
                  app_port: int, dead_port: int, allowed_port: int, proxied_port: int,
                  tls_version: str | None, tls_cipher: str | None, mtls_bytes: int,
                  pp_bytes: int) -> None:
    for rec in records:
        assert_record_shape(rec)
        assert rec["node"] == "obs-node" and rec["event"] == "flow"
    ids = [r["flow_id"] for r in records]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "ULIDs sort in accept order"
    allowed, denied, no_cert, proxied, garbage, dead = records

    def local(listener: str) -> dict[str, Any]:
        return {"ip": "127.0.0.1", "port": ports[listener]}

    app = {"name": "app", "address": f"127.0.0.1:{app_port}", "tls": "off"}
    client = load_cert(pki.client.cert)
    dns, uri = sans(client)
    assert subset(allowed, {
        "listener": "mtls", "action": "allow", "ruleset": "mesh", "rule": "outbound-may-call",
        "reason": "rule", "client": {"ip": "127.0.0.1", "port": allowed_port},
        "peer": {"ip": "127.0.0.1", "port": allowed_port}, "local": local("mtls"),
        "proxy_protocol": None, "upstream": app,
        "bytes": {"from_client": mtls_bytes, "to_client": mtls_bytes}, "close": "client_fin"})
    assert "detail" not in allowed
    tls = allowed["tls"]
    assert (tls["version"], tls["cipher"], tls["sni"], tls["resumed"]) == (
        tls_version, tls_cipher, "localhost", False)
    assert subset(tls["peer"], {"spiffe_id": CLIENT_ID, "cn": "client", "dns": dns, "uri": uri,
                                "spki_sha256": spki_sha256(client)})
    assert tls["peer"]["not_after"] == client.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")

    assert subset(denied, {
        "listener": "mtls", "action": "deny", "ruleset": "mesh", "rule": "no-intruders",
        "reason": "rule", "local": local("mtls"), "proxy_protocol": None, "upstream": None,
        "bytes": {"from_client": 0, "to_client": 0}, "close": "denied"})
    assert denied["client"] == denied["peer"]
    other = load_cert(pki.other.cert)
    assert subset(denied["tls"]["peer"], {"spiffe_id": INTRUDER_ID,
                                          "spki_sha256": spki_sha256(other)})
    assert denied["detail"] == "denied by rule no-intruders of ruleset mesh"

    assert subset(no_cert, {
        "listener": "mtls", "action": "error", "ruleset": "mesh", "rule": None,
        "reason": "handshake_failed", "local": local("mtls"), "proxy_protocol": None,
        "upstream": None, "bytes": {"from_client": 0, "to_client": 0},
        "close": "handshake_failed"})
    assert no_cert["tls"] == {"version": None, "cipher": no_cert["tls"]["cipher"],
                              "sni": "localhost", "resumed": None, "peer": None,
                              "group": None}
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in no_cert["detail"]

    assert subset(proxied, {
        "listener": "pp", "action": "allow", "ruleset": "open", "rule": None,
        "reason": "default", "client": {"ip": "203.0.113.7", "port": 51234},
        "peer": {"ip": "127.0.0.1", "port": proxied_port}, "local": local("pp"),
        "proxy_protocol": {"version": 2, "command": "PROXY",
                           "tlvs": {"aws_vpce_id": "vpce-0abc"}},
        "tls": None, "upstream": app,
        "bytes": {"from_client": pp_bytes, "to_client": pp_bytes}, "close": "client_fin"})

    assert subset(garbage, {
        "listener": "pp", "action": "error", "rule": None,
        "reason": "proxy_protocol_bad_signature", "local": local("pp"),
        "proxy_protocol": None, "tls": None, "upstream": None,
        "bytes": {"from_client": 0, "to_client": 0}, "close": "proxy_protocol_bad_signature"})
    assert garbage["client"] == garbage["peer"]

    assert subset(dead, {
        "listener": "dead", "action": "error", "ruleset": "open", "rule": None,
        "reason": "upstream_connect_failed", "local": local("dead"), "proxy_protocol": None,
        "tls": None, "bytes": {"from_client": 0, "to_client": 0},
        "upstream": {"name": "gone", "address": f"127.0.0.1:{dead_port}", "tls": "off"},
        "close": "upstream_connect_failed"})
    assert dead["client"] == dead["peer"]

    last = dt.datetime.strptime(records[-1]["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
    first = dt.datetime.strptime(records[0]["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert first <= last


def subset(record: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Every expected key has exactly the expected value (with a readable failure)."""
    got = {k: record.get(k, "<missing>") for k in expected}
    assert got == expected
    return True
