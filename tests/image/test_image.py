"""The container image as it runs in a pod: read-only root file system, its own uid,
every capability dropped. A sidecar pair in two containers moves bytes (sha256 checked),
a rules change arrives through a ``..data`` symlink swap (as the kubelet updates a
ConfigMap volume) and is reloaded, SIGTERM drains an open connection and exits 0, and a
missing or broken config exits 2 with one line saying what is wrong.

Runs only when ENFORCER_TEST_IMAGE names a built image (``make image-test`` builds it with
``.ci/image build`` and sets it); podman runs through ``.ci/podman`` (CI's storage).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import secrets
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.tlsconf.certs import DEMO_CLIENT_ID, DEMO_SERVER_ID, Pki, init_pki
from tests.e2e.harness import sha
from tests.image.volume import KubeletVolume

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("ENFORCER_TEST_IMAGE", "")
UID = 10001

pytestmark = [
    pytest.mark.image,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not IMAGE, reason="ENFORCER_TEST_IMAGE is not set (make image-test)"),
]


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / ".ci" / "podman"), *args], capture_output=True,
                          text=True, check=check, timeout=timeout)


def run_options() -> list[str]:
    """How a pod runs it: read-only root (no tmpfs either), no capabilities, no privilege
    gain; host network (the test's peers are on loopback). The limits are set explicitly
    because the machine's root may not raise them (no CAP_SYS_RESOURCE)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return ["--network", "host", "--read-only", "--read-only-tmpfs=false",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def wait_for(cond: Any, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Echo:
    """The app: a TCP echo server on loopback (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def roundtrip(port: int, payload: bytes) -> bytes:
    """Send ``payload`` and half-close; return every byte that came back before the end.
    A reset ends the answer like a FIN (a refused connection may end either way: the peer
    that refuses it may reset while the payload is still arriving); the bytes are checked
    by the caller either way."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        def send() -> None:
            with contextlib.suppress(OSError):
                c.sendall(payload)
                c.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while data := c.recv(65536):
                got += data
        sender.join(30)
    return bytes(got)


def secret_files(pki: Pki, which: str) -> dict[str, bytes]:
    leaf = pki.server if which == "server" else pki.client
    return {"tls.crt": leaf.cert.read_bytes(), "tls.key": leaf.key.read_bytes(),
            "ca.crt": pki.ca.read_bytes()}


def rules(allow: bool) -> bytes:
    inbound = {"default": "deny", "rules": [
        {"name": "frontend", "action": "allow" if allow else "deny",
         "from": {"identities": [DEMO_CLIENT_ID]}}]}
    return yaml.safe_dump({"rulesets": {"inbound": inbound,
                                        "outbound": {"default": "allow"}}}).encode()


def config(listener: dict[str, Any], upstream: dict[str, Any], admin_port: int) -> bytes:
    """A config laid out as in deploy/: config, rules and TLS mounted as directories."""
    return yaml.safe_dump({
        "version": 1, "node": {"name": listener["name"]},
        "tls": {"mesh": {"dir": "/etc/enforcer/tls"}},
        "listeners": [listener], "upstreams": {"up": upstream},
        "rulesets_file": "/etc/enforcer/rules/rules.yaml",
        "flow_log": {"sink": "stdout"},
        "admin": {"listen": f"127.0.0.1:{admin_port}", "stall_timeout": "5s"},
        "limits": {"drain_timeout": "30s"},
    }, sort_keys=False).encode()


@dataclass
class Sidecar:
    name: str
    port: int  # its listener
    admin: int
    rules: KubeletVolume

    def pid(self) -> int:
        return int(podman("inspect", "--format", "{{.State.Pid}}", self.name).stdout.strip())

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr


def start(name: str, pod: Path, *extra: str) -> subprocess.Popen[str]:
    mounts = [f"{pod / d}:/etc/enforcer/{d}:ro" for d in ("config", "rules", "tls")]
    args = ["run", "-d", "--name", name, *run_options()]
    for m in mounts:
        args += ["-v", m]
    return subprocess.Popen([str(REPO / ".ci" / "podman"), *args, *extra, IMAGE],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, Sidecar, Echo]]:
    """frontend's sidecar (plain in, mTLS out) -> payments' sidecar (mTLS in) -> echo app."""
    base = tmp_path_factory.mktemp("pods")
    pki = init_pki(base / "pki")
    echo = Echo()
    tag = secrets.token_hex(4)
    sidecars: list[Sidecar] = []
    ports = {k: free_port() for k in ("in", "in_admin", "out", "out_admin")}
    layout = [
        ("payments", "server", ports["in"], ports["in_admin"],
         {"name": "inbound", "listen": f"127.0.0.1:{ports['in']}",
          "tls": {"mode": "terminate", "material": "mesh", "client_auth": "required"},
          "ruleset": "inbound", "upstream": "up"},
         {"address": f"127.0.0.1:{echo.port}"}),
        ("frontend", "client", ports["out"], ports["out_admin"],
         {"name": "outbound", "listen": f"127.0.0.1:{ports['out']}", "tls": {"mode": "off"},
          "ruleset": "outbound", "upstream": "up"},
         {"address": f"127.0.0.1:{ports['in']}",
          "tls": {"mode": "mtls", "material": "mesh", "verify": {"uri": [DEMO_SERVER_ID]}}}),
    ]
    procs = []
    for app, leaf, port, admin, listener, upstream in layout:
        pod = base / app
        KubeletVolume(pod / "config", {"config.yaml": config(listener, upstream, admin)})
        volume = KubeletVolume(pod / "rules", {"rules.yaml": rules(allow=True)})
        KubeletVolume(pod / "tls", secret_files(pki, leaf))
        name = f"enforcer-it-{app}-{tag}"
        sidecars.append(Sidecar(name, port, admin, volume))
        procs.append(start(name, pod))  # both containers are made at once
    try:
        for proc in procs:
            _out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
        for car in sidecars:
            wait_for(lambda car=car: http(car.admin, "/readyz")[0] == 200, what=car.name)
        yield sidecars[0], sidecars[1], echo
    finally:
        for car in sidecars:
            podman("rm", "-f", "-t", "0", car.name, check=False)
        echo.close()


def test_the_image_is_labelled_and_runs_as_its_uid() -> None:
    info = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    cfg = info["Config"]
    assert cfg["User"] == f"{UID}:{UID}"
    assert cfg["Entrypoint"] == ["enforcer"]
    assert not cfg.get("Volumes"), "no VOLUME: a missing mount must be seen, not papered over"
    labels = cfg["Labels"]
    for key in ("title", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.title"] == "enforcer"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    if head:
        assert labels["org.opencontainers.image.revision"] == head


def test_the_pair_runs_confined(pair: tuple[Sidecar, Sidecar, Echo]) -> None:
    for car in pair[:2]:
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{car.pid()}/status").read_text().splitlines() if ":\t" in line)
        assert status["Uid"].split()[:2] == [str(UID), str(UID)]
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
        assert status["NoNewPrivs"].strip() == "1"
        root = [line.split() for line in Path(f"/proc/{car.pid()}/mountinfo").read_text()
                .splitlines() if line.split()[4] == "/"]
        assert root and "ro" in root[0][5].split(","), root
        assert json.loads(http(car.admin, "/status")[1])["relay"] == "native"
        assert http(car.admin, "/healthz") == (200, "ok\n")


def test_the_pair_moves_bytes(pair: tuple[Sidecar, Sidecar, Echo]) -> None:
    client = pair[1]
    payloads = [os.urandom(1_000_000 + i) for i in range(4)]
    for payload in payloads:
        assert sha(roundtrip(client.port, payload)) == sha(payload)


def _ruleset_reloads(car: Sidecar) -> str | None:
    status = json.loads(http(car.admin, "/status")[1])
    return status["reloads"]["rulesets"]["last_ok"]


def test_a_rules_change_is_reloaded_through_the_data_swap(
        pair: tuple[Sidecar, Sidecar, Echo]) -> None:
    server, client = pair[0], pair[1]
    payload = os.urandom(200_000)
    assert sha(roundtrip(client.port, payload)) == sha(payload)
    server.rules.update({"rules.yaml": rules(allow=False)})
    wait_for(lambda: _ruleset_reloads(server) is not None, what="the rules reload")
    assert roundtrip(client.port, payload) == b"", "the denied client gets nothing back"
    server.rules.update({"rules.yaml": b"rulesets: {inbound: {default: maybe}}\n"})
    wait_for(lambda: json.loads(http(server.admin, "/status")[1])["reloads"]["rulesets"]
             ["result"] == "error", what="the broken rules to be refused")
    assert roundtrip(client.port, payload) == b"", "a broken file keeps the last good rules"
    server.rules.update({"rules.yaml": rules(allow=True)})
    wait_for(lambda: json.loads(http(server.admin, "/status")[1])["reloads"]["rulesets"]
             ["result"] == "ok", what="the good rules again")
    assert sha(roundtrip(client.port, payload)) == sha(payload)
    logs = server.logs()
    assert "rulesets.inbound.default" in logs, "the refused reload names the key"


def test_sigterm_drains_the_open_connection_and_exits_0(
        pair: tuple[Sidecar, Sidecar, Echo]) -> None:
    server, client = pair[0], pair[1]
    first, rest = os.urandom(300_000), os.urandom(300_000)
    with socket.create_connection(("127.0.0.1", client.port), timeout=30) as conn:
        conn.sendall(first)
        got = bytearray()
        while len(got) < len(first):
            got += conn.recv(65536)
        podman("kill", "--signal", "TERM", server.name)
        wait_for(lambda: http(server.admin, "/readyz")[0] == 503, what="draining")
        with pytest.raises(OSError):  # the server side stops accepting: a new connection
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        conn.sendall(rest)  # the open connection still flows while draining
        conn.shutdown(socket.SHUT_WR)
        while data := conn.recv(65536):
            got += data
    assert sha(bytes(got)) == sha(first + rest)
    code = podman("wait", server.name).stdout.strip()
    assert code == "0", server.logs()
    assert "draining open connections" in server.logs()


def _run_once(tmp: Path, files: dict[str, bytes] | None) -> tuple[int, list[str]]:
    args = ["run", "--rm", *run_options()]
    if files is not None:
        KubeletVolume(tmp / "config", files)
        args += ["-v", f"{tmp / 'config'}:/etc/enforcer/config:ro"]
    done = podman(*args, IMAGE, check=False)
    return done.returncode, done.stderr.splitlines()


def test_without_the_config_mount_it_says_what_to_mount_where(tmp_path: Path) -> None:
    code, lines = _run_once(tmp_path, None)
    assert code == 2
    assert lines[-2:] == [
        "enforcer: error: /etc/enforcer/config/config.yaml: cannot read: No such file or "
        "directory",
        "enforcer: error: nothing at /etc/enforcer/config/config.yaml: mount the directory "
        "holding config.yaml at /etc/enforcer/config (in Kubernetes: the config ConfigMap as "
        "a volume there, not with subPath; see docs/kubernetes.md)"]


def test_a_broken_config_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    broken = {"version": 1, "node": {"name": "x"},
              "listeners": [{"name": "a", "listen": "127.0.0.1:0", "tls": {"mode": "off"},
                             "ruleset": "r", "upstream": "u"}],
              "upstreams": {"u": {"address": "127.0.0.1:9", "timeout": "3s"}},
              "rulesets": {"r": {"default": "allow"}}}
    code, lines = _run_once(tmp_path, {"config.yaml": yaml.safe_dump(broken).encode()})
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("enforcer: error: /etc/enforcer/config/config.yaml: "
                               "upstreams.u.timeout: unknown key"), lines


def _as_the_init_container(user: str, caps: list[str], *command: str) -> list[str]:
    """``podman run`` with the security context of deploy/sidecar's `intercept` init
    container: read-only root, every capability dropped but ``caps``, no privilege gain,
    in a network namespace of its own (never the host's: the rules would land there)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    adds = [f"--cap-add={cap}" for cap in caps]
    return ["run", "--rm", "--network", "none", "--read-only", "--read-only-tmpfs=false",
            "--cap-drop", "ALL", *adds, "--security-opt", "no-new-privileges",
            "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096",
            "--user", user, "--entrypoint", "sh", IMAGE, "-c", " ".join(command)]


def test_the_intercept_init_container_installs_its_rules() -> None:
    """deploy/sidecar's `intercept` init container, as rendered: its arguments, its uid and
    its one capability install exactly the ruleset `show --dry-run` prints; without
    NET_ADMIN it exits 6 with one line."""
    from tests.e2e import deployed  # kubectl kustomize (skips without kubectl)

    docs = deployed.render("sidecar")
    init = deployed.container(docs, "intercept")
    sc = init["securityContext"]
    user = f"{sc['runAsUser']}:{sc['runAsGroup']}"
    args = " ".join(f"'{a}'" for a in deployed.intercept_args(docs))
    script = (f"enforcer intercept apply {args} && echo applied && enforcer intercept show"
              f" && echo ==== && enforcer intercept show --dry-run {args}")
    done = podman(*_as_the_init_container(user, sc["capabilities"]["add"], script),
                  check=False)
    assert done.returncode == 0, done.stderr
    applied, _, want = done.stdout.partition("====\n")
    assert applied.startswith("applied\ntable inet enforcer {"), done.stdout
    assert "redirect to :15006" in want and "meta skuid 10001 return" in want
    assert deployed.ruleset_words(applied.removeprefix("applied\n")) == \
        deployed.ruleset_words(want), (applied, want)
    done = podman(*_as_the_init_container(user, [], f"enforcer intercept apply {args}"),
                  check=False)
    assert done.returncode == 6, done
    assert done.stderr.splitlines()[-1].startswith(
        "enforcer: error: CAP_NET_ADMIN is missing"), done.stderr
