"""The benchmark harness's transparent pair (``--netns``) and its control: their rules,
and one connection through each freshly started pair in a namespace the test creates
(bytes checked by sha256): the explicit pair leaves conntrack idle, the control
(``enforcer-nathooks``) makes conntrack track its connection without redirecting it, the
transparent pair's counters show the redirects (one per rule and connection, as
``benchmarks.callgrind --transparent`` relies on); the rules are gone after each pair stops.
No workload is measured here."""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.transparent import (
    OUTBOUND_UID,
    UNUSED_PORT,
    harness_argv,
    hook_rules,
    other_interpreter,
    rules,
)
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
from benchmarks.contestants import Enforcer
from benchmarks.transparent import NatHooksEnforcer, TransparentEnforcer, redirected

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
def tracked():
    return int(Path("/proc/sys/net/netfilter/nf_conntrack_count").read_text())
def one(pair):
    payload = os.urandom(500_000)
    with socket.create_connection(("127.0.0.1", pair.entry_port)) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while data := s.recv(65536):
            got += data
    return hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
out = {"ports": [], "same": {}, "tracked": {}}
for name, contestant, table in (("explicit", Enforcer(), None),
                                ("nathooks", NatHooksEnforcer(), "enforcer-bench-hooks"),
                                ("transparent", TransparentEnforcer(), "enforcer-bench")):
    out["missing_" + name] = contestant.missing()
    pair = contestant.start(env, port)
    out["ports"].append(pair.entry_port)
    out["same"][name] = one(pair)
    out["tracked"][name] = tracked()  # conntrack entries outlive their connections
    if table:
        out["rules_" + name] = subprocess.run(["nft", "list", "table", "inet", table],
                                              capture_output=True, text=True).stdout
        out["redirected_" + name] = redirected(table)
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


def test_the_control_loads_the_same_rules_for_an_unused_port() -> None:
    control = hook_rules(15001, 15006, table="t")
    assert control == rules(UNUSED_PORT, 15001, 15006, table="t")
    assert "redirect to :15006" in control and f"tcp dport {UNUSED_PORT} " in control


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
    # an interpreter uid 1337 cannot read as it is (pyenv under /root) is refused by name
    assert out["missing_nathooks"] is None
    assert out["missing_transparent"] == other_interpreter(OUTBOUND_UID)
    assert out["same"] == {"explicit": True, "nathooks": True, "transparent": True}
    # no rules, no conntrack; the control's rules make conntrack track (and redirect nothing)
    assert out["tracked"]["explicit"] == 0 and out["tracked"]["nathooks"] > 0, out["tracked"]
    hooks = [int(n) for n in re.findall(r"packets (\d+)", out["rules_nathooks"])]
    assert hooks == [0, 0] and "tcp dport 9 " in out["rules_nathooks"], out["rules_nathooks"]
    counters = [int(n) for n in re.findall(r"packets (\d+)", out["rules_transparent"])]
    assert len(counters) == 2 and all(n > 0 for n in counters), out["rules_transparent"]
    # what benchmarks.callgrind checks: one match per rule and connection (the first packet)
    assert out["redirected_nathooks"] == [0, 0]
    assert out["redirected_transparent"] == [1, 1], out["rules_transparent"]
    assert "enforcer-bench" not in out["after"]
    # listener ports come from below the namespace's ephemeral range (32768-60999 here;
    # the transparent pair's entry is the backend's own port)
    assert all(1024 <= p < 32768 for p in out["ports"][:2]), out["ports"]


def test_an_interpreter_the_sidecar_uid_cannot_run_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The transparent sidecars run under their own uids: if those cannot run the harness's
    interpreter as it is, the column would measure another Python, so it is not offered."""
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    why = other_interpreter(OUTBOUND_UID) or ""
    assert why.startswith("uid 1337 cannot run this harness's Python as it is "
                          "(/nonexistent/python3: not started instead of "), why


def test_without_a_private_namespace_it_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.transparent import ENV_FLAG, NatHooksEnforcer, TransparentEnforcer

    monkeypatch.delenv(ENV_FLAG, raising=False)
    assert "needs --netns" in (TransparentEnforcer().missing() or "")
    assert "needs --netns" in (NatHooksEnforcer().missing() or "")


def test_ports_come_from_below_the_ephemeral_range(tmp_path: Path) -> None:
    """Listener ports never compete with connections' source ports (whose TIME_WAIT
    sockets can fill the ephemeral range after idle-large); a range starting too low
    for that leaves the choice to the kernel."""
    from benchmarks.procs import Ports, ephemeral_range

    sysctl = tmp_path / "range"
    sysctl.write_text("40000\t60999\n")
    assert ephemeral_range(sysctl) == (40000, 60999)
    ports = Ports(sysctl)
    taken = [ports.take() for _ in range(50)]
    assert len(set(taken)) == 50 and all(40000 - 8192 <= p < 40000 for p in taken)
    sysctl.write_text("1025 60999\n")
    low = Ports(sysctl)
    assert all(p >= 1025 for p in (low.take(), low.take()))
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)
