"""The admin endpoint of a real ``Server``: /healthz, /readyz through a drain, /status
(listeners, upstreams, materials checked against the certificate files, reload results),
/metrics in both exposition formats, and HTTP edge cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)

from enforcer.config.loader import load_config
from enforcer.dataplane.tasks import spawn
from enforcer.runtime.server import Server
from enforcer.tlsconf.certs import issue
from tests.conftest import Pki
from tests.e2e.harness import Backend, sha
from tests.e2e.observe_util import (
    admin_port,
    http_get,
    labels,
    listener_port,
    load_cert,
    read_records,
    sans,
    scrape,
    serving,
    spki_sha256,
    talk,
    tls_client_ctx,
    wait_until,
)

ISO = "%Y-%m-%dT%H:%M:%SZ"


def plain_config(backend_port: int, flows: Path, **limits: str) -> dict[str, Any]:
    return {
        "version": 1, "node": {"name": "admin-node"},
        "listeners": [{"name": "plain", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                       "ruleset": "open", "upstream": "app"}],
        "upstreams": {"app": {"address": f"127.0.0.1:{backend_port}"}},
        "rulesets": {"open": {"default": "allow"}},
        "flow_log": {"sink": f"file:{flows}"},
        "limits": limits or {},
    }


async def test_readyz_is_503_while_draining_and_healthz_stays_200(tmp_path: Path) -> None:
    backend = await Backend(mode="hold").start()
    flows = tmp_path / "flows.jsonl"
    try:
        async with serving(plain_config(backend.port, flows, drain_timeout="60s")) as server:
            admin, port = admin_port(server), listener_port(server, "plain")
            assert (await http_get(admin, "/readyz")).status == 200
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"held open")
            await writer.drain()
            await wait_until(lambda: backend.connections == 1)
            status = (await http_get(admin, "/status")).json()
            assert (status["draining"], status["ready"], status["open_connections"]) == (
                False, True, 1)
            assert status["listeners"][0]["open_connections"] == 1

            shutdown = spawn(server.shutdown(), name="test-shutdown")
            await wait_until(lambda: server.plane.draining)
            ready = await http_get(admin, "/readyz")
            assert (ready.status, ready.body) == (503, b"not ready\n")
            health = await http_get(admin, "/healthz")
            assert (health.status, health.body) == (200, b"ok\n")
            status = (await http_get(admin, "/status")).json()
            assert (status["draining"], status["ready"], status["open_connections"]) == (
                True, False, 1)
            with pytest.raises(OSError):  # the listener no longer accepts
                await asyncio.open_connection("127.0.0.1", port)
            assert not shutdown.done(), "the drain waits for the open connection"

            writer.write_eof()  # the held connection ends: the drain can finish
            assert await asyncio.wait_for(reader.read(), 10) == b""
            assert await asyncio.wait_for(shutdown, 10) == 0
            writer.close()
            with pytest.raises(OSError):  # the admin endpoint is gone after shutdown
                await http_get(admin, "/healthz")
        records = read_records(flows)
        assert [(r["action"], r["close"]) for r in records] == [("allow", "client_fin")]
        assert records[0]["bytes"] == {"from_client": len(b"held open"), "to_client": 0}
        assert backend.received == [b"held open"]
    finally:
        await backend.close()


def material_config(pki: Pki, certs: Path, backend_port: int, flows: Path) -> dict[str, Any]:
    """Two materials (a server one on a listener, a client one on an mTLS upstream), so
    /status has a listener with TLS, an upstream with TLS and two certificates to show."""
    server_leaf = issue(pki.base, certs, name="status-server", dns=["status.example",
                        "localhost"], spiffe_id="spiffe://enforcer.demo/ns/admin/sa/server",
                        ips=["127.0.0.1"], days=30)
    client_leaf = issue(pki.base, certs, name="status-client",
                        spiffe_id="spiffe://enforcer.demo/ns/admin/sa/client", days=45)
    return {
        "version": 1, "node": {"name": "status-node"},
        "tls": {"front": {"cert": str(server_leaf.cert), "key": str(server_leaf.key),
                          "ca": str(pki.ca)},
                "back": {"cert": str(client_leaf.cert), "key": str(client_leaf.key),
                         "ca": str(pki.ca)}},
        "listeners": [
            {"name": "front", "listen": "127.0.0.1:0", "ruleset": "rs", "upstream": "app",
             "tls": {"mode": "terminate", "material": "front", "client_auth": "required"}},
            {"name": "relay", "listen": "127.0.0.1:0", "ruleset": "rs", "upstream": "mesh",
             "tls": {"mode": "off"},
             "proxy_protocol": {"accept": "optional", "trusted_sources": ["127.0.0.1/32"]}}],
        "upstreams": {
            "app": {"address": f"127.0.0.1:{backend_port}"},
            "mesh": {"address": "127.0.0.1:9", "tls": {"mode": "mtls", "material": "back",
                                                      "server_name": "localhost"},
                     "proxy_protocol": {"send": "v2"}}},
        "rulesets": {"rs": {"default": "allow"}},
        "flow_log": {"sink": f"file:{flows}"},
        "admin": {"listen": "127.0.0.1:0"},
    }


def expected_certificate(path: Path) -> dict[str, Any]:
    cert = load_cert(path)
    dns, uri = sans(cert)
    return {"subject": cert.subject.rfc4514_string(), "dns": dns, "uri": uri,
            "spiffe_id": uri[0], "not_after": cert.not_valid_after_utc.strftime(ISO),
            "not_before": cert.not_valid_before_utc.strftime(ISO),
            "spki_sha256": spki_sha256(cert), "serial": f"{cert.serial_number:x}"}


def certificate_view(status: dict[str, Any], material: str) -> dict[str, Any]:
    (entry,) = [m for m in status["materials"] if m["name"] == material]
    return {k: entry["certificate"][k] for k in ("subject", "dns", "uri", "spiffe_id",
                                                 "not_after", "not_before", "spki_sha256",
                                                 "serial")}


async def test_status_lists_listeners_upstreams_materials_and_reloads(
        pki: Pki, tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    certs, flows = tmp_path / "certs", tmp_path / "flows.jsonl"
    certs.mkdir()
    raw = material_config(pki, certs, backend.port, flows)
    config_file = tmp_path / "enforcer.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    server = Server(load_config(str(config_file)))
    # the test reloads by hand; the file watcher (a poll each second) would reload the
    # changed files once more whenever a poll falls between a write and the scrape
    server.reloader.interval = 3600
    server.flowlog.start()
    await server.start()
    try:
        admin = admin_port(server)
        payload = os.urandom(50_000)
        ctx = tls_client_ctx(pki.ca, pki.client.cert, pki.client.key)
        reply = await talk(listener_port(server, "front"), payload, ssl_ctx=ctx,
                           server_hostname="status.example")
        assert sha(reply.received) == sha(payload)
        await wait_until(lambda: server.flowlog.written == 1)
        status = (await http_get(admin, "/status")).json()
        check_static_status(status, server)
        front, back = raw["tls"]["front"]["cert"], raw["tls"]["back"]["cert"]
        assert certificate_view(status, "front") == expected_certificate(Path(front))
        assert certificate_view(status, "back") == expected_certificate(Path(back))
        assert status["reloads"] == {kind: {"last_attempt": None, "last_ok": None,
                                            "last_error": None, "result": None, "files": []}
                                     for kind in ("tls", "rulesets")}
        assert status["flow_log"] == {"sink": "file", "path": str(flows), "queued": 0,
                                      "written": 1, "dropped": 0}
        memory = status["memory"]
        assert set(memory) == {"rss_bytes", "heap_free_bytes", "heap_trim", "heap_trims",
                               "heap_returned_bytes"}
        assert memory["rss_bytes"] > 10 * 2**20
        assert memory["heap_trim"] is server.heap_trimmer.available  # glibc malloc: True
        assert memory["heap_trims"] == server.heap_trimmer.trims >= 0
        assert memory["heap_returned_bytes"] == server.heap_trimmer.returned_bytes

        # a broken rulesets reload: kept the last good state, and /status says why
        broken = dict(raw, rulesets={"rs": {"default": "maybe"}})
        config_file.write_text(yaml.safe_dump(broken))
        assert server.reloader.reload_rulesets() is False
        reloads = (await http_get(admin, "/status")).json()["reloads"]
        assert reloads["rulesets"]["result"] == "error"
        assert "rulesets.rs.default" in reloads["rulesets"]["last_error"]
        assert reloads["rulesets"]["last_ok"] is None
        assert reloads["tls"]["result"] is None

        # a renewed certificate: /status and the expiry gauge follow the new file
        renewed = issue(pki.base, certs, name="status-server", dns=["renewed.example"],
                        spiffe_id="spiffe://enforcer.demo/ns/admin/sa/server", days=60)
        config_file.write_text(yaml.safe_dump(raw))
        assert server.reloader.reload_rulesets() is True
        assert server.reloader.reload_tls() is True
        status = (await http_get(admin, "/status")).json()
        assert certificate_view(status, "front") == expected_certificate(renewed.cert)
        assert certificate_view(status, "front")["dns"] == ["renewed.example"]
        assert status["reloads"]["rulesets"]["result"] == "ok"
        assert status["reloads"]["rulesets"]["last_error"] is None
        assert status["reloads"]["rulesets"]["last_attempt"] == status["reloads"]["rulesets"][
            "last_ok"]
        assert status["reloads"]["tls"]["result"] == "ok"
        assert str(renewed.cert) in status["reloads"]["tls"]["files"]
        assert str(config_file) in status["reloads"]["rulesets"]["files"]
        samples = await scrape(admin)
        assert samples["enforcer_reloads_total"] == {
            labels(kind="rulesets", result="ok"): 1, labels(kind="rulesets", result="error"): 1,
            labels(kind="tls", result="ok"): 1, labels(kind="tls", result="error"): 0}
        assert samples["enforcer_certificate_expiry_timestamp_seconds"] == {
            labels(material="front"): load_cert(renewed.cert).not_valid_after_utc.timestamp(),
            labels(material="back"): load_cert(Path(back)).not_valid_after_utc.timestamp()}
    finally:
        await server.shutdown()
        server.flowlog.close()
        await backend.close()


def check_static_status(status: dict[str, Any], server: Server) -> None:
    from enforcer import __version__

    assert status["version"] == __version__ and status["node"] == "status-node"
    assert status["uptime_s"] >= 0 and status["started"].endswith("Z")
    assert (status["ready"], status["draining"], status["open_connections"]) == (True, False, 0)
    assert (status["relay"], status["native_relayed"]) == ("native", 0)
    bound = {lst.name: f"127.0.0.1:{lst.local_port}" for lst in server.plane.listeners}
    cache = status["listeners"][0].pop("session_cache")  # the TLS listener's, natively bounded
    assert cache["bound"] == 2048 and 0 <= cache["sessions"] <= 2
    assert status["listeners"][1].pop("session_cache") is None  # a plain TCP listener
    assert status["listeners"] == [
        {"name": "front", "listen": "127.0.0.1:0", "bound": bound["front"],
         "tls": "terminate", "material": "front", "client_auth": "required",
         "proxy_protocol": "off", "ruleset": "rs", "upstream": "app", "open_connections": 0},
        {"name": "relay", "listen": "127.0.0.1:0", "bound": bound["relay"], "tls": "off",
         "material": None, "client_auth": None, "proxy_protocol": "optional", "ruleset": "rs",
         "upstream": "mesh", "open_connections": 0}]
    app_address = server.cfg.upstreams["app"].address
    assert status["upstreams"] == [
        {"name": "app", "address": str(app_address), "tls": "off", "material": None,
         "proxy_protocol": "off"},
        {"name": "mesh", "address": "127.0.0.1:9", "tls": "mtls", "material": "back",
         "proxy_protocol": "v2"}]


async def test_metrics_formats_and_http_edges(tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    try:
        async with serving(plain_config(backend.port, tmp_path / "f.jsonl")) as server:
            admin = admin_port(server)
            reply = await talk(listener_port(server, "plain"), b"ping")
            assert reply.received == b"ping"
            await wait_until(lambda: len(read_records(tmp_path / "f.jsonl")) == 1)

            om = await http_get(admin, "/metrics",
                                {"Accept": "application/openmetrics-text; version=1.0.0"})
            assert om.status == 200
            assert om.headers["content-type"].startswith("application/openmetrics-text")
            assert om.body.endswith(b"# EOF\n")
            families = {f.name: f for f in openmetrics_families(  # type: ignore[no-untyped-call]
                om.body.decode())}
            conns = {tuple(sorted(s.labels.items())): s.value
                     for s in families["enforcer_connections"].samples
                     if s.name == "enforcer_connections_total"}
            assert conns[(("action", "allow"), ("listener", "plain"))] == 1
            assert families["enforcer_tls_handshake_seconds"].type == "histogram"
            assert not any(s.name.endswith("_created")
                           for f in families.values() for s in f.samples)

            zipped = await http_get(admin, "/metrics", {"Accept-Encoding": "gzip"})
            assert zipped.headers["content-encoding"] == "gzip"
            plain = await http_get(admin, "/metrics")
            assert b"enforcer_bytes_total" in gzip.decompress(zipped.body)
            assert "content-encoding" not in plain.headers

            head = await http_get(admin, "/metrics", method="HEAD")
            assert (head.status, head.body) == (200, b"")
            assert int(head.headers["content-length"]) > 0
            assert (await http_get(admin, "/nope")).status == 404
            post = await http_get(admin, "/metrics", method="POST")
            assert (post.status, post.headers["allow"]) == (405, "GET, HEAD")
            assert (await http_get(admin, "/status?pretty=1")).status == 200
    finally:
        await backend.close()


async def test_admin_on_a_unix_socket(tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    path = tmp_path / "admin.sock"
    cfg = plain_config(backend.port, tmp_path / "f.jsonl")
    cfg["admin"] = {"listen": f"unix:{path}"}
    try:
        async with serving(cfg):
            reply = await asyncio.to_thread(unix_get, str(path), "/readyz")
            assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(b"ready\n")
        assert not path.exists(), "the socket file is removed at shutdown"
    finally:
        await backend.close()


def unix_get(path: str, target: str) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.0\r\n\r\n".encode())
        out = b""
        with contextlib.suppress(TimeoutError):
            while data := sock.recv(65536):
                out += data
        return out


def test_status_names_a_material_certificate_it_cannot_read(pki: Any, tmp_path: Path) -> None:
    """Its own certificate with a zero serial (peers refuse it): /status says why instead of
    failing as a whole."""
    import warnings

    from enforcer.runtime.server import _material_status
    from enforcer.tlsconf.material import load_material
    from tests.e2e.tls_util import material_cfg, openssl_issued

    odd = openssl_issued(pki, tmp_path, "0")
    with warnings.catch_warnings():  # cryptography warns while loading it
        warnings.simplefilter("ignore")
        material = load_material(material_cfg(cert=str(odd.cert), key=str(odd.key),
                                              ca=str(pki.ca)))
    view = _material_status("odd", material)
    assert view["certificate"] == {
        "subject": "CN=odd-serial",
        "error": "the certificate's serial number is not positive (RFC 5280)"}
