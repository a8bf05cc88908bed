"""The benchmark harness's transparent pair (``--netns``): its redirect rules, and one
connection through a freshly started pair in a namespace the test creates (bytes checked
by sha256; the rule counters show the redirects happened; the rules are gone after the
pair stops). No workload is measured here."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.transparent import harness_argv, rules
from tests.e2e.netns import topology

CHECKOUT = Path(__file__).resolve().parents[2]
# Inside the namespace: an echo backend, the pair, one connection to the backend's own
# address, then the counters and the tables once the pair stopped.
SCRIPT = """
import hashlib, json, os, socket, subprocess, sys, threading
from pathlib import Path
from benchmarks.contestants import Env, stop_pair
from benchmarks.pki import make_pki
from benchmarks.procs import Ports, Processes
from benchmarks.transparent import TransparentEnforcer

tmp = Path(sys.argv[1])
srv = socket.create_server(("127.0.0.1", 0))
port = srv.getsockname()[1]
def echo():
    while True:
        c, _ = srv.accept()
        with c:
            while data := c.recv(65536):
                c.sendall(data)
threading.Thread(target=echo, daemon=True).start()
env = Env(tmp, make_pki(tmp / "pki"), Processes(), Ports())
contestant = TransparentEnforcer()
out = {"missing": contestant.missing()}
pair = contestant.start(env, port)
payload = os.urandom(500_000)
with socket.create_connection(("127.0.0.1", pair.entry_port)) as s:
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    got = b""
    while data := s.recv(65536):
        got += data
out["same"] = hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
out["rules"] = subprocess.run(["nft", "list", "table", "inet", "enforcer-bench"],
                              capture_output=True, text=True).stdout
stop_pair(env, pair)
out["after"] = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
print(json.dumps(out))
"""


def test_rules_skip_the_inbound_uid_and_split_by_the_outbound_one() -> None:
    text = rules(8080, 15001, 15006, table="t")
    assert text.startswith("table inet t\ndelete table inet t\n")
    lines = [line.strip() for line in text.splitlines()]
    assert lines.index("meta skuid 1338 return") < lines.index(
        "meta skuid 1337 ip daddr 127.0.0.1 tcp dport 8080 counter redirect to :15006")
    assert "ip daddr 127.0.0.1 tcp dport 8080 counter redirect to :15001" in lines


def test_harness_argv() -> None:
    assert harness_argv(["bench", "--netns", "--quick"]) == ["--netns", "--quick"]
    assert harness_argv(["--netns"]) == ["--netns"]


def test_one_connection_through_the_transparent_pair() -> None:
    # a temp dir as the harness makes one (under /tmp, whose other directories the
    # sidecars' uids can traverse; pytest's tmp_path sits under a root-only directory)
    tmp = Path(tempfile.mkdtemp(prefix="enforcer-bench-"))
    try:
        with topology("bt") as topo:
            ns = topo.ns("bench")
            done = ns.run("env", "ENFORCER_BENCH_NETNS=1", f"PYTHONPATH={CHECKOUT}",
                          sys.executable, "-c", SCRIPT, str(tmp), check=False, timeout=120)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["missing"] is None
    assert out["same"], "bytes through the transparent pair"
    counters = [int(n) for n in re.findall(r"packets (\d+)", out["rules"])]
    assert len(counters) == 2 and all(n > 0 for n in counters), out["rules"]
    assert "enforcer-bench" not in out["after"]


def test_without_a_private_namespace_it_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.transparent import ENV_FLAG, TransparentEnforcer

    monkeypatch.delenv(ENV_FLAG, raising=False)
    assert "needs --netns" in (TransparentEnforcer().missing() or "")
