"""Pods with an enforcer sidecar in network namespaces: the app's traffic is intercepted
by ``enforcer intercept apply`` and goes through transparent listeners (mesh mode).

test_across_hosts.py runs the configs and interception arguments rendered from
``deploy/`` (tests/e2e/deployed.py); test_mesh.py, which exercises every mesh mode
(strict/permissive, external plaintext, IPv6, a peer with the wrong identity), uses the
template ``configs/sidecar.yaml`` (``${VAR}`` placeholders).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.netns import Netns
from tests.e2e.proc import EnforcerProcess, enforcer_cmd

CONFIGS = Path(__file__).with_name("configs")
APPS = str(Path(__file__).with_name("netapps.py"))
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def as_user(uid: int) -> list[str]:
    """A command prefix running the command as ``uid`` (group ``uid``, no other groups)."""
    return ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"]


def render(name: str, **values: Any) -> dict[str, Any]:
    """``configs/NAME`` with ``${KEY}`` replaced by ``values``; the parsed YAML."""
    text = string.Template((CONFIGS / name).read_text()).substitute(
        {k: str(v) for k, v in values.items()})
    return dict(yaml.safe_load(text))


@dataclass
class Host:
    """A namespace with the processes a test started in it (killed on ``stop``)."""

    ns: Netns
    ip: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    enforcer: EnforcerProcess | None = None
    flows: Path | None = None
    user: list[str] = field(default_factory=lambda: list(NOBODY))  # the apps' uid

    def app(self, *args: str) -> None:
        proc = self.ns.popen([sys.executable, APPS, *args], stdout=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n", args

    def client(self, host: str, port: int, size: int = 200_000, seed: int = 1, *,
               as_app: bool = True) -> dict[str, Any]:
        who = self.user if as_app else []
        out = self.ns.run(*who, sys.executable, APPS, "client", host, str(port), str(size),
                          str(seed), timeout=90).stdout
        return dict(json.loads(out))

    def sidecar(self, cfg: dict[str, Any], workdir: Path, listeners: int,
                intercept: list[str], uid: int | None = None) -> None:
        """Interception applied as root with ``intercept`` (as an init container does),
        then ``enforcer run`` with ``cfg`` in this namespace, as ``uid``: the uid the rules
        skip. ``uid`` None: enforcer runs as root and ``--uid 0`` is added to the rules
        (the apps run as 65534)."""
        extra = ["--uid", "0"] if uid is None else []
        done = self.ns.run(*enforcer_cmd("intercept", "apply", *extra, *intercept),
                           check=False)
        assert done.returncode == 0, done.stderr
        path = workdir / f"{self.ns.name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        who = as_user(uid) if uid is not None else []
        self.enforcer = EnforcerProcess(path, prefix=self.ns.cmd(*who))
        self.enforcer.wait_bound(listeners)

    def records(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        assert self.flows is not None
        deadline = time.monotonic() + timeout
        while True:
            lines = self.flows.read_text().splitlines() if self.flows.exists() else []
            if len(lines) >= count or time.monotonic() > deadline:
                return [json.loads(line) for line in lines]
            time.sleep(0.05)

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample from the sidecar's admin endpoint (127.0.0.1:15000 in its namespace)."""
        script = ("import urllib.request; print(urllib.request.urlopen("
                  "'http://127.0.0.1:15000/metrics', timeout=10).read().decode())")
        text = self.ns.run(sys.executable, "-c", script).stdout
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key.split("{")[0] == name and ",".join(sorted(
                    key.partition("{")[2].rstrip("}").split(","))) == want:
                return float(value)
        return None

    def stop(self) -> None:
        if self.enforcer is not None:
            self.enforcer.stop()
        for proc in self.procs:
            proc.kill()
            proc.wait()


@contextmanager
def capture(ns: Netns, ifname: str, bpf: str, pcap: Path) -> Iterator[None]:
    """tcpdump on ``ifname`` in ``ns`` (a bridge port: one host's traffic) while the block
    runs; the packets are in ``pcap`` after it."""
    tcpdump = shutil.which("tcpdump") or pytest.skip("tcpdump is not installed")
    cap = subprocess.Popen(ns.cmd(tcpdump, "-i", ifname, "-U", "-w", str(pcap), bpf),
                           stderr=subprocess.PIPE)
    try:
        assert cap.stderr is not None
        cap.stderr.readline()  # "listening on ...": packets are captured from here on
        yield
        time.sleep(0.5)  # the last packets reach the file (-U writes each one)
    finally:
        cap.terminate()
        cap.wait(10)


def assert_tls_only(pcap: Path, port: int, size: int, seed: int) -> None:
    """No 64-byte piece of the seeded payload is in the capture, and tshark (when there)
    sees TLS handshake and application data records on ``port``."""
    wire = pcap.read_bytes()
    payload = random.Random(seed).randbytes(size)
    for i in range(0, len(payload) - 64, max(1, size // 6)):
        assert payload[i:i + 64] not in wire, "payload in clear on the wire"
    tshark = shutil.which("tshark")
    if tshark is None:
        return
    fields = subprocess.run([tshark, "-r", str(pcap), "-d", f"tcp.port=={port},tls", "-T",
                             "fields", "-e", "tls.record.content_type", "-e",
                             "tls.record.opaque_type"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    seen = {t for field in fields.split() for t in field.split(",") if t}
    assert {"22", "23"} <= seen, seen  # handshake and (TLS 1.3: opaque) application data


def expected(size: int, seed: int, prefix: bytes = b"") -> str:
    """sha256 of what an echo app sends back: its PROXY line (if any), then the payload."""
    return hashlib.sha256(prefix + random.Random(seed).randbytes(size)).hexdigest()
