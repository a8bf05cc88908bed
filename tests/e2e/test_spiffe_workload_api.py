"""``tls.<name>.spiffe: {socket: unix:...}``: TLS material from the SPIFFE Workload API.

No SPIRE agent can run here, so the test serves the Workload API itself: a real gRPC
server on a unix socket implementing ``SpiffeWorkloadAPI.FetchX509SVID`` with the same
proto (the ``spiffe`` package's generated code), streaming X509SVIDResponse messages and
refusing calls without the ``workload.spiffe.io`` header, as an agent does. A real
in-process ``Server`` (with its 1 s reloader) takes its certificate, key and trust bundle
from it; mTLS clients move bytes through (checked by sha256) and see the SVID in use; a
new SVID and a new trust bundle pushed on the stream are swapped in live, and the expiry
metric follows."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import os
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enforcer.config.loader import load_config
from enforcer.observe.flowlog import MemoryFlowLog
from enforcer.observe.metrics import Metrics
from enforcer.runtime.server import Server
from enforcer.tlsconf import spiffe
from tests.e2e.harness import Backend, inbound_cfg, wait_until
from tests.e2e.proc import EchoServer, EnforcerProcess, enforcer_cmd, write_config
from tests.e2e.tls_util import echo_once, mtls_client, sha

with warnings.catch_warnings():  # the package imports cryptography's deprecated DSA
    warnings.simplefilter("ignore")
    from spiffe._proto import workload_pb2, workload_pb2_grpc

SERVER_ID = "spiffe://enforcer.demo/ns/demo/sa/inbound"
CLIENT_ID = "spiffe://enforcer.demo/ns/demo/sa/outbound"


# ---------------------------------------------------------------------------- certificates
class Pki:
    """A SPIFFE trust domain's CA issuing X.509 SVIDs (what SPIRE's server would)."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name_ = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        self.cert = (
            x509.CertificateBuilder().subject_name(name_).issuer_name(name_)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256()))

    def svid(self, spiffe_id: str, *, hours: float = 1,
             expired: bool = False) -> tuple[x509.Certificate, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5, hours=3 if expired else 0)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svid")]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=hours))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier(spiffe_id), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        return cert, key


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                         decipher_only=False)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


# ---------------------------------------------------------------------------- the agent
class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    """FetchX509SVID: the current response at once, then again after every ``publish``."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.response: Any = None
        self.version = 0
        self.stopping = False
        self.refused = 0
        self.server: Any = None

    def publish(self, cert: x509.Certificate, key: Any, bundle: list[x509.Certificate],
                spiffe_id: str = SERVER_ID) -> None:
        svid = workload_pb2.X509SVID(
            spiffe_id=spiffe_id, x509_svid=cert.public_bytes(Encoding.DER),
            x509_svid_key=key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()),
            bundle=b"".join(c.public_bytes(Encoding.DER) for c in bundle))
        with self.cond:
            self.response = workload_pb2.X509SVIDResponse(svids=[svid])
            self.version += 1
            self.cond.notify_all()

    def FetchX509SVID(self, request: Any, context: Any) -> Iterator[Any]:
        if dict(context.invocation_metadata()).get("workload.spiffe.io") != "true":
            self.refused += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        sent = 0
        while context.is_active():
            with self.cond:
                self.cond.wait_for(functools.partial(self._news, sent), 0.2)
                if self.stopping:
                    return
                if self.response is None or self.version == sent:
                    continue
                sent, response = self.version, self.response
            yield response

    def _news(self, sent: int) -> bool:
        return self.stopping or (self.response is not None and self.version != sent)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[WorkloadApi, Path]]:
    sock = tmp_path / "agent.sock"
    api = WorkloadApi()
    server = api.server = serve(api, sock)
    try:
        yield api, sock
    finally:
        with api.cond:
            api.stopping = True
            api.cond.notify_all()
        spiffe.close_all()
        server.stop(0).wait(5)


@pytest.fixture
async def running(agent: tuple[WorkloadApi, Path], tmp_path: Path,
                  pki: Any) -> AsyncIterator[Any]:
    servers: list[tuple[Server, Backend]] = []

    async def start() -> Server:
        backend = await Backend(mode="echo").start()
        cfg = inbound_cfg(pki, backend.port, rules=[
            {"name": "outbound", "action": "allow", "from": {"identities": [CLIENT_ID]}}])
        cfg["tls"]["mesh"] = {"spiffe": {"socket": f"unix:{agent[1]}", "timeout": "5s"}}
        server = Server(load_config(str(write_config(tmp_path / "enforcer.yaml", cfg))),
                        metrics=Metrics(), flowlog=MemoryFlowLog())
        server.reloader.interval = 0.2
        await server.start()
        servers.append((server, backend))
        return server

    yield start
    for server, backend in servers:
        await server.shutdown()
        await backend.close()


def client_files(tmp_path: Path, pki: Pki, trusted: list[Pki], name: str = "client"
                 ) -> tuple[Path, Path, Path]:
    cert, key = pki.svid(CLIENT_ID)
    paths = tmp_path / f"{name}.crt", tmp_path / f"{name}.key", tmp_path / f"{name}-ca.crt"
    paths[0].write_bytes(pem(cert))
    paths[1].write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    paths[2].write_bytes(b"".join(pem(p.cert) for p in trusted))
    return paths


def expiry(server: Server) -> float | None:
    return server.metrics.registry.get_sample_value(
        "enforcer_certificate_expiry_timestamp_seconds", {"material": "mesh"})


async def test_svid_and_bundle_rotate_live(agent: tuple[WorkloadApi, Path], running: Any,
                                          tmp_path: Path) -> None:
    api, _ = agent
    td = Pki("enforcer.demo CA")
    first, first_key = td.svid(SERVER_ID)
    api.publish(first, first_key, [td.cert])
    crt, key, ca = client_files(tmp_path, td, [td])
    server = await running()
    ctx = mtls_client(ca, crt, key)

    payload = os.urandom(200_000)
    got, serial = await echo_once(server.plane.listeners[0].local_port, ctx, payload)
    assert sha(got) == sha(payload) and serial == first.serial_number
    assert expiry(server) == first.not_valid_after_utc.timestamp()
    assert api.refused == 0

    # SPIRE rotates the SVID (same CA): new handshakes get the new one within the poll
    second, second_key = td.svid(SERVER_ID, hours=2)
    api.publish(second, second_key, [td.cert])
    port = server.plane.listeners[0].local_port
    await wait_until(lambda: expiry(server) == second.not_valid_after_utc.timestamp(), 10)
    payload = os.urandom(100_000)
    got, serial = await echo_once(port, ctx, payload)
    assert sha(got) == sha(payload) and serial == second.serial_number

    # The trust domain moves to a new CA: the bundle carries both during the change, so a
    # client with an SVID of the new CA is let in, and the server's new SVID is verified
    new_td = Pki("enforcer.demo CA 2")
    third, third_key = new_td.svid(SERVER_ID)
    api.publish(third, third_key, [td.cert, new_td.cert])
    await wait_until(lambda: expiry(server) == third.not_valid_after_utc.timestamp(), 10)
    crt2, key2, ca2 = client_files(tmp_path, new_td, [td, new_td], name="client2")
    payload = os.urandom(100_000)
    got, serial = await echo_once(port, mtls_client(ca2, crt2, key2), payload)
    assert sha(got) == sha(payload) and serial == third.serial_number
    status = server.status()
    assert status["reloads"]["tls"]["result"] == "ok"


async def test_a_bad_svid_keeps_the_last_good_one(agent: tuple[WorkloadApi, Path],
                                                  running: Any, tmp_path: Path) -> None:
    """An expired SVID (an agent that lost its server) is refused like a broken file:
    the running one stays, and the reload error is counted and shown."""
    api, _ = agent
    td = Pki("enforcer.demo CA")
    good, good_key = td.svid(SERVER_ID)
    api.publish(good, good_key, [td.cert])
    crt, key, ca = client_files(tmp_path, td, [td])
    server = await running()
    bad, bad_key = td.svid(SERVER_ID, expired=True)
    api.publish(bad, bad_key, [td.cert])
    errors = lambda: server.metrics.registry.get_sample_value(  # noqa: E731
        "enforcer_reloads_total", {"kind": "tls", "result": "error"})
    await wait_until(lambda: (errors() or 0) >= 1, 10)
    payload = os.urandom(50_000)
    got, serial = await echo_once(server.plane.listeners[0].local_port,
                                  mtls_client(ca, crt, key), payload)
    assert sha(got) == sha(payload) and serial == good.serial_number
    error = server.status()["reloads"]["tls"]["last_error"]
    assert "tls.mesh.spiffe" in error and "expired" in error, error
    assert expiry(server) == good.not_valid_after_utc.timestamp()


def test_check_without_an_agent_names_the_key(tmp_path: Path, pki: Any) -> None:
    cfg = inbound_cfg(pki, 9)
    cfg["tls"]["mesh"] = {"spiffe": {"socket": f"unix:{tmp_path}/none.sock", "timeout": "1s"}}
    path = tmp_path / "enforcer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(enforcer_cmd("check", "-c", str(path)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert (f"tls.mesh.spiffe: no X.509 SVID from the Workload API at "
            f"unix:{tmp_path}/none.sock within 1s") in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(("spiffe_cfg", "message"), [
    ({"socket": "/run/agent.sock"}, "tls.mesh.spiffe.socket: the Workload API socket is "
                                    "unix:/path"),
    ({"socket": "unix:/x", "timeout": "0s"}, "tls.mesh.spiffe.timeout: must be more than 0s"),
    ({"path": "unix:/x"}, "tls.mesh.spiffe"),
    ({"socket": "unix:/" + "x" * 120}, "fit in a socket address"),
    ({"socket": "unix:/x", "extra": 1}, "tls.mesh.spiffe"),
])
def test_bad_spiffe_config(tmp_path: Path, pki: Any, spiffe_cfg: dict[str, Any],
                           message: str) -> None:
    cfg = inbound_cfg(pki, 9)
    cfg["tls"]["mesh"] = {"spiffe": spiffe_cfg}
    path = tmp_path / "enforcer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(enforcer_cmd("check", "-c", str(path)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_spiffe_and_files_do_not_mix(tmp_path: Path, pki: Any) -> None:
    cfg = inbound_cfg(pki, 9)
    cfg["tls"]["mesh"]["spiffe"] = {"socket": "unix:/run/agent.sock"}
    path = tmp_path / "enforcer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(enforcer_cmd("check", "-c", str(path)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert "give one source of certificate and key, not cert and spiffe" in res.stderr
    assert "tls.mesh.ca: goes with files" in res.stderr



def serve(api: WorkloadApi, sock: Path) -> Any:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(api, server)
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    return server


async def test_agent_restart_keeps_the_svid_then_takes_the_new_one(
        agent: tuple[WorkloadApi, Path], running: Any, tmp_path: Path) -> None:
    """The agent goes away (its stream ends, the socket is gone for a while): handshakes go
    on with the last SVID; the agent comes back with a new SVID, which is taken."""
    api, sock = agent
    td = Pki("enforcer.demo CA")
    first, first_key = td.svid(SERVER_ID)
    api.publish(first, first_key, [td.cert])
    crt, key, ca = client_files(tmp_path, td, [td])
    server = await running()
    port = server.plane.listeners[0].local_port
    ctx = mtls_client(ca, crt, key)
    with api.cond:  # the agent dies: its streams end, its socket goes
        api.stopping = True
        api.cond.notify_all()
    api.server.stop(0).wait(5)
    sock.unlink(missing_ok=True)
    await asyncio.sleep(1.5)
    payload = os.urandom(50_000)
    got, serial = await echo_once(port, ctx, payload)
    assert sha(got) == sha(payload) and serial == first.serial_number

    restarted = WorkloadApi()
    second, second_key = td.svid(SERVER_ID, hours=3)
    restarted.publish(second, second_key, [td.cert])
    again = serve(restarted, sock)
    try:
        await wait_until(lambda: expiry(server) == second.not_valid_after_utc.timestamp(), 20)
        got, serial = await echo_once(port, ctx, payload)
        assert sha(got) == sha(payload) and serial == second.serial_number
    finally:
        with restarted.cond:
            restarted.stopping = True
            restarted.cond.notify_all()
        spiffe.close_all()
        again.stop(0).wait(5)


def test_check_with_the_agent_passes(agent: tuple[WorkloadApi, Path], tmp_path: Path,
                                     pki: Any) -> None:
    api, sock = agent
    td = Pki("enforcer.demo CA")
    cert, key = td.svid(SERVER_ID)
    api.publish(cert, key, [td.cert])
    cfg = inbound_cfg(pki, 9)
    cfg["tls"]["mesh"] = {"spiffe": {"socket": f"unix://{sock}"}}  # the URI form works too
    path = tmp_path / "enforcer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(enforcer_cmd("check", "-c", str(path)), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "ok (1 listener(s)" in res.stdout


def _echo_serial(port: int, ctx: ssl.SSLContext, payload: bytes) -> tuple[bytes, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        serial = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
        tls.sendall(payload)
        got = bytearray()
        while len(got) < len(payload):
            data = tls.recv(65536)
            if not data:
                break
            got += data
        return bytes(got), serial


def test_workers_each_follow_the_agent(agent: tuple[WorkloadApi, Path], tmp_path: Path,
                                       pki: Any) -> None:
    """``enforcer run`` with two workers (real processes): each takes the SVID from the
    agent, and each swaps in the next one."""
    api, sock = agent
    td = Pki("enforcer.demo CA")
    first, first_key = td.svid(SERVER_ID)
    api.publish(first, first_key, [td.cert])
    crt, key, ca = client_files(tmp_path, td, [td])
    ctx = mtls_client(ca, crt, key)
    echo = EchoServer()
    cfg = inbound_cfg(pki, echo.port, rules=[
        {"name": "outbound", "action": "allow", "from": {"identities": [CLIENT_ID]}}])
    cfg["tls"]["mesh"] = {"spiffe": {"socket": f"unix:{sock}"}}
    cfg["workers"] = 2
    proc = EnforcerProcess(write_config(tmp_path / "w.yaml", cfg))
    try:
        port = proc.wait_bound()["inbound"]
        for _ in range(6):
            payload = os.urandom(64_000)
            got, serial = _echo_serial(port, ctx, payload)
            assert sha(got) == sha(payload) and serial == first.serial_number
        second, second_key = td.svid(SERVER_ID, hours=2)
        api.publish(second, second_key, [td.cert])
        deadline = time.monotonic() + 20
        streak = 0
        while streak < 10:  # ten in a row: both workers have the new SVID
            assert time.monotonic() < deadline, "\n".join(proc.stderr_lines)
            payload = os.urandom(16_000)
            got, serial = _echo_serial(port, ctx, payload)
            assert sha(got) == sha(payload)
            streak = streak + 1 if serial == second.serial_number else 0
            time.sleep(0.05)
    finally:
        proc.stop()
        echo.close()
