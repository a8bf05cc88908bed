"""Egress rules on the addresses a name resolves to, through the system resolver.

The proxy host runs enforcer in its own mount namespace with a bind-mounted /etc/hosts the
test owns (the system's /etc/hosts is never touched), so getaddrinfo itself answers: an
"internal" host (denied by ``to.cidrs``) and a live web server sit in their own network
namespaces. curl (``--socks5-hostname`` and ``-x --proxytunnel``) asks for names:

- ``rebind.test`` resolves to the internal address only: refused before any connect
  (``close: denied_resolved_address``, SOCKS5 0x02 / HTTP 403), the record naming the
  refused address; the internal host never sees a connection;
- ``mixed.test`` resolves to the internal address first, then the live one: the file
  comes through byte-exact (sha256), from the live server only;
- ``app.test`` resolves to the live server: allowed as before.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool
from tests.e2e.proc import write_config
from tests.faults.netns import Host, hosts
from tests.faults.peers import Backend, NsEnforcer

pytestmark = [pytest.mark.faults]

PORT = 8080
BLOB = os.urandom(300_000)


class _Blob(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB)

    def log_message(self, *args: Any) -> None:
        pass


def _web(host: Host, ip: str) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer((ip, PORT), _Blob, bind_and_activate=False)
    server.socket.close()
    server.socket = host.listen(ip, PORT)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _curl(host: Host, *args: str) -> tuple[int, bytes, str]:
    proc = host.popen([require_tool("curl"), "-sS", "--max-time", "20", *args],
                      stdout=-1, stderr=-1)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err.decode(errors="replace")


def test_names_resolving_into_a_denied_network(tmp_path: Path, faults_summary: Any) -> None:
    with hosts() as made:
        proxy, live, internal = made.host("p"), made.host("l"), made.host("i")
        _, live_ip = made.link(proxy, live)
        _, internal_ip = made.link(proxy, internal)
        web = _web(live, live_ip)
        trap = Backend(internal.listen(internal_ip, PORT), "echo")
        etc_hosts = tmp_path / "hosts"
        etc_hosts.write_text(f"127.0.0.1 localhost\n{internal_ip} rebind.test\n"
                             f"{internal_ip} mixed.test\n{live_ip} mixed.test\n"
                             f"{live_ip} app.test\n")
        listener = {"tls": {"mode": "off"}, "ruleset": "egress", "upstream": "requested"}
        cfg = {
            "version": 1, "node": {"name": "egress"},
            "listeners": [
                {"name": "socks", "listen": "127.0.0.1:0", "protocol": "socks5", **listener},
                {"name": "connect", "listen": "127.0.0.1:0", "protocol": "http_connect",
                 **listener}],
            "upstreams": {"requested": {"address": "original_destination"}},
            "rulesets": {"egress": {"default": "deny", "rules": [
                {"name": "web", "action": "allow", "to": {"hosts": ["*.test"],
                                                          "ports": [PORT]}},
                {"name": "no-internal", "action": "deny",
                 "to": {"cidrs": [f"{internal_ip}/32"]}}]}},
        }
        wrap = ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
                str(etc_hosts)]
        enf = NsEnforcer(proxy, write_config(tmp_path / "p.yaml", cfg), wrap=wrap)
        try:
            ports = enf.wait_bound(2)
            proxies = (["--socks5-hostname", f"127.0.0.1:{ports['socks']}"],
                       ["-x", f"http://127.0.0.1:{ports['connect']}", "--proxytunnel"])
            for proxy_args in proxies:
                code, _, err = _curl(proxy, *proxy_args, f"http://rebind.test:{PORT}/")
                assert code != 0 and ("(2)" in err or "403" in err), err
                for name in ("mixed.test", "app.test"):
                    code, out, err = _curl(proxy, *proxy_args, f"http://{name}:{PORT}/blob")
                    assert code == 0, err
                    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(BLOB).hexdigest()
            recs = enf.wait_records(6)
            refused = [r for r in recs if r["close"] == "denied_resolved_address"]
            assert len(refused) == 2 and all(r["action"] == "deny" for r in refused)
            assert {r["listener"] for r in refused} == {"socks", "connect"}
            for r in refused:
                assert r["egress"]["host"] == "rebind.test"
                assert f"{internal_ip} (denied by rule 'no-internal')" in r["detail"], r
            allowed = [r for r in recs if r["action"] == "allow"]
            assert len(allowed) == 4 and all(r["rule"] == "web" for r in allowed)
            assert trap.connections == 0, "nothing may reach the denied address"
            assert sum(f"mixed.test resolved also to addresses the rules refuse ({internal_ip})"
                       in line for line in enf.stderr_lines) == 2, enf.stderr()
            faults_summary("egress names through getaddrinfo: an internal-only name refused "
                           "before connecting (socks5 and CONNECT), a mixed name served "
                           "byte-exact from its allowed address only")
        finally:
            enf.stop()
            web.shutdown()
            trap.close()
