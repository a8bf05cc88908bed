"""The benchmark harness's egress proxies (``--workloads egress``), no timing assertions.

- The client handshakes of the egress load tool (``benchmarks.tunnel``) against the
  bytes RFC 1928/1929 and RFC 9110 prescribe, fed in any pieces, and their refusals; the
  response check (status, length, sha256).
- ``test_quick_egress_run_*``: ``python -m benchmarks --quick --workloads egress`` against
  enforcer, and (slow) against dante and tinyproxy when installed: every workload moved
  bytes that the load tool checked by sha256, with no error; the "Egress proxies" table is in
  egress-quick.md, latest-quick.* is not written (an egress-only run never replaces the
  pairs' summary), and no process the harness started is left.
- Which summary file a run writes, and the egress table in a combined report; the
  fallback HTTP backend (no nginx) serves the bulk file by its path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import egress
from benchmarks.backends import BODY_SIZE, BULK_PATH, BULK_SIZE, body, bulk_body, sha256_of
from benchmarks.options import EGRESS_CONTESTANTS, EGRESS_WORKLOADS
from benchmarks.report import latest_name, markdown
from benchmarks.tunnel import HttpConnect, Login, Response, Socks5, TunnelError
from tests.e2e.test_bench import harness_leftovers, is_number

ROOT = Path(__file__).resolve().parents[2]


def feed_bytewise(hs: Socks5 | HttpConnect, data: bytes) -> tuple[bytes, bool, bytes]:
    """Feed one byte at a time; the sends joined, and the last verdict."""
    sent, opened, rest = b"", False, b""
    for i in range(len(data)):
        out, opened, rest = hs.feed(data[i:i + 1])
        sent += out
    return sent, opened, rest


def test_socks5_without_login() -> None:
    hs = Socks5("127.0.0.1", 8080)
    assert hs.first() == b"\x05\x01\x00"
    sent, opened, _ = feed_bytewise(hs, b"\x05\x00")
    assert sent == b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90" and not opened
    # a reply with a domain name as bound address (length byte 4), then destination bytes
    sent, opened, rest = hs.feed(b"\x05\x00\x00\x03\x04host\x00\x50HTTP")
    assert (sent, opened, rest) == (b"", True, b"HTTP")


def test_socks5_with_login() -> None:
    hs = Socks5("10.1.2.3", 443, Login("bench", "pw"))
    assert hs.first() == b"\x05\x01\x02"
    assert hs.feed(b"\x05\x02") == (b"\x01\x05bench\x02pw", False, b"")
    sent, opened, _ = feed_bytewise(hs, b"\x01\x00")
    assert sent == b"\x05\x01\x00\x01\x0a\x01\x02\x03\x01\xbb" and not opened
    sent, opened, _ = feed_bytewise(hs, b"\x05\x00\x00\x04" + bytes(16) + b"\x00\x01")
    assert opened


@pytest.mark.parametrize(("login", "answers", "message"), [
    (None, [b"\x05\xff"], "SOCKS5 method reply 0x5 0xff"),
    (Login("u", "p"), [b"\x05\x02", b"\x01\x01"], "SOCKS5 login refused (status 0x1)"),
    (None, [b"\x05\x00", b"\x05\x02\x00\x01"], "reply 0x2 (not allowed by ruleset)"),
    (None, [b"\x05\x00", b"\x05\x00\x00\x09\x00"], "address type 0x9"),
])
def test_socks5_refusals(login: Login | None, answers: list[bytes], message: str) -> None:
    hs = Socks5("127.0.0.1", 1, login)
    with pytest.raises(TunnelError, match=re.escape(message)):
        for answer in answers:
            hs.feed(answer)


def test_http_connect() -> None:
    hs = HttpConnect("127.0.0.1", 8080, Login("bench", "pw"))
    assert hs.first() == (b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                          b"Proxy-Authorization: Basic YmVuY2g6cHc=\r\n\r\n")
    sent, opened, rest = feed_bytewise(hs, b"HTTP/1.0 200 Connection established\r\n\r\n")
    assert (sent, opened, rest) == (b"", True, b"")
    assert HttpConnect("h", 1).feed(b"HTTP/1.1 200 OK\r\nVia: x\r\n\r\nab") == (b"", True, b"ab")
    with pytest.raises(TunnelError, match=re.escape("CONNECT refused: 'HTTP/1.1 407")):
        HttpConnect("h", 1).feed(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    with pytest.raises(TunnelError, match="without an end"):
        HttpConnect("h", 1).feed(b"x" * 20000)


def response(body: bytes, status: bytes = b"200 OK", length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(n).encode() + b"\r\n\r\n" + body


def test_response_is_checked_by_sha256() -> None:
    body = os.urandom(3000)
    digest = hashlib.sha256(body).hexdigest()
    whole = response(body)
    r = Response(len(body), digest)
    assert [r.feed(whole[i:i + 7]) for i in range(0, len(whole), 7)][-1] is True
    flipped = whole[:-1] + bytes([whole[-1] ^ 1])
    with pytest.raises(TunnelError, match="sha256"):
        Response(len(body), digest).feed(flipped)
    with pytest.raises(TunnelError, match=re.escape("response 'HTTP/1.1 404")):
        Response(len(body), digest).feed(response(body, b"404 Not Found"))
    with pytest.raises(TunnelError, match="Content-Length 2999 instead of 3000"):
        Response(len(body), digest).feed(response(body[:-1]))
    with pytest.raises(TunnelError, match="1 bytes after the response body"):
        Response(len(body), digest).feed(whole + b"x")


def test_option_lists_match_the_egress_module() -> None:
    assert tuple(egress.BY_NAME) == EGRESS_WORKLOADS
    assert ("enforcer", *EGRESS_CONTESTANTS) == egress.NAMES


def installed_peers() -> list[str]:
    return [c.name for c in (egress.Dante(), egress.Tinyproxy()) if c.missing() is None]


def run_egress(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    (out / "tmp").mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(out / "tmp"))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--duration", "1", "--out", str(out),
         "--workloads", "egress", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=env, check=False)
    summary = out / "egress-quick.json"
    assert summary.exists(), done.stderr[-3000:]
    return done, json.loads(summary.read_text())


def check_egress_run(out: Path, contestants: list[str]) -> None:
    """A quick egress run of ``contestants``: every measurement moved bytes that the load
    tool checked by sha256, without an error, and the table is written."""
    done, doc = run_egress(out, "--only", ",".join(contestants))
    assert done.returncode == 0, done.stderr[-3000:]
    assert doc["workloads"] == {} and doc["mode"] == "quick"
    table = doc["egress"]
    assert set(table["workloads"]) == set(EGRESS_WORKLOADS)
    assert set(table["contestants"]) == set(contestants)
    for name, w in table["workloads"].items():
        spec = egress.BY_NAME[name]
        expected = {c.name for c in egress.contestants(spec.protocol, set(contestants))}
        assert set(w["results"]) == expected, name
        for who, r in w["results"].items():
            if r["status"] == "n/a":  # a login the harness cannot set up for this peer
                assert spec.login and who != "enforcer" and r["reason"]
                continue
            assert r["status"] == "ok", (name, who, r)
            v = r["values"]
            assert v["errors"] == 0
            size = BULK_SIZE if spec.mode == "bulk" else BODY_SIZE
            # every byte counted was in a body whose sha256 the load tool checked
            assert v["bytes_checked"] > 0 and v["bytes_checked"] % size == 0
            for m in w["metrics"]:
                assert is_number(v[m["key"]]), (name, who, m["key"])
    md = (out / "egress-quick.md").read_text()
    assert "## Egress proxies" in md
    assert "| workload | metric | " + " | ".join(contestants) + " |" in md
    for w in table["workloads"].values():
        assert f"| {w['title']} |" in md
    assert not (out / "latest-quick.json").exists()  # the pairs' summary is untouched
    assert not (out / "latest.json").exists()
    assert harness_leftovers(str(out / "tmp")) == []
    assert list((out / "tmp").iterdir()) == []


def test_quick_egress_run_enforcer(tmp_path: Path) -> None:
    check_egress_run(tmp_path, ["enforcer"])


@pytest.mark.slow
@pytest.mark.skipif(not installed_peers(), reason="neither dante-server nor tinyproxy installed")
def test_quick_egress_run_peers(tmp_path: Path) -> None:
    """dante and tinyproxy as the harness configures them (without enforcer: its own
    test covers it, and the ratios are not what is checked here)."""
    check_egress_run(tmp_path, installed_peers())


@pytest.mark.skipif(egress.Dante().missing() is not None, reason="dante-server not installed")
def test_dante_is_named_in_the_listing() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert "egress     dante       ready  (SOCKS5)" in done.stdout


def fake_doc(pairs: bool) -> dict[str, Any]:
    w = egress.BY_NAME["socks5-bulk"]
    results = {"enforcer": {"status": "ok", "values": {"gbit_per_s": 2.0, "cpu_s_per_gb": 0.5}},
               "dante": {"status": "ok", "values": {"gbit_per_s": 1.0, "cpu_s_per_gb": 1.0}}}
    comparison = {"gbit_per_s": {"ratio": 2.0, "best_peer": "dante"},
                  "cpu_s_per_gb": {"ratio": 0.5, "best_peer": "dante"}}
    entry = {**w.doc(_settings()), "results": results, "comparison": comparison}
    return {"mode": "full", "started_at": "2026-01-01T00:00:00Z", "duration_s": 1.0,
            "interrupted": False, "run_dir": "runs/x", "micro": {"status": "skipped"},
            "host": {"cpus": 2, "kernel": "k", "machine": "m", "python": "3", "openssl": "o"},
            "settings": {"suite": None}, "backends": {}, "tools": {}, "contestants": {},
            "workloads": {"latency": {"title": "t", "status": "skipped", "reason": "r",
                                      "metrics": [], "results": {}, "comparison": {}}}
            if pairs else {},
            "egress": {"contestants": {
                "enforcer": {"status": "ok", "peer": False, "version": "1", "setup": {"socks5": "s"}},
                "dante": {"status": "skipped", "peer": True, "reason": "danted not installed "
                          "(apt install dante-server)", "setup": {"socks5": "d"}}},
                "workloads": {"socks5-bulk": entry}}}


def _settings() -> Any:
    from benchmarks.workloads import Settings

    return Settings.make(False, None, 10000)


@pytest.mark.parametrize(("pairs", "name"), [(True, "latest"), (False, "egress")])
def test_summary_file_and_table(pairs: bool, name: str) -> None:
    doc = fake_doc(pairs)
    assert latest_name(doc) == name
    assert latest_name({**doc, "mode": "quick"}) == f"{name}-quick"
    md = markdown(doc)
    assert ("| SOCKS5: bulk download through one tunnel | Gbit/s ↑ | 2.00 | 1.00 | "
            "2.00\u00d7 (dante) |") in md
    assert ("## Results" in md) is pairs
    assert "- **dante**: skipped: danted not installed (apt install dante-server)" in md


def get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def test_the_fallback_backend_serves_each_file_by_path(tmp_path: Path) -> None:
    """Without nginx, benchmarks.httpd serves the bulk file the egress workloads fetch."""
    (tmp_path / "bench.txt").write_bytes(body())
    (tmp_path / "bulk.bin").write_bytes(bulk_body())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.httpd", str(port),
                             str(tmp_path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        for path, expected in (("/bulk.bin", BULK_PATH), ("/bench.txt", "/bench.txt"),
                               ("/other", "/bench.txt")):
            r = Response(BULK_SIZE if expected == BULK_PATH else BODY_SIZE, sha256_of(expected))
            assert r.feed(get(port, path)) is True, path
    finally:
        proc.terminate()
        proc.wait(10)
