"""Egress logins under load, end to end (egress/logincheck.py): a burst of first logins
costs one scrypt per distinct login and all of them get through byte-exact; a cached login
does not survive a credentials change; a flood of wrong passwords beyond the scrypt pool's
bound is refused at once while an already verified user still gets through.

scrypt hashes here use the real default cost (ln=15) where the cost matters."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from enforcer.egress import credentials as credmod
from enforcer.egress import logincheck
from enforcer.egress.credentials import ScryptHash, hash_password
from tests.conftest import require_tool
from tests.e2e.egress_util import FakeResolver, egress_cfg, egress_errors, raw_session
from tests.e2e.harness import Enforcer, running, wait_until
from tests.e2e.test_real_clients import HttpBackend
from tests.e2e.tls_util import run_tool

pytestmark = [pytest.mark.needs_tool, pytest.mark.usefixtures("relay_mode")]

TAIL = os.urandom(64 * 1024)


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> FakeResolver:
    return FakeResolver(monkeypatch)


@pytest.fixture
def scrypt_runs(monkeypatch: pytest.MonkeyPatch) -> dict[bytes, int]:
    """Counts real scrypt runs by password (the check itself is unchanged)."""
    runs: dict[bytes, int] = {}
    real = ScryptHash.verify

    def counted(self: ScryptHash, password: bytes) -> bool:
        runs[password] = runs.get(password, 0) + 1
        return real(self, password)

    monkeypatch.setattr(ScryptHash, "verify", counted)
    return runs


def _users(path: Path, users: dict[str, str], ln: int = 15) -> str:
    tmp = path.with_suffix(".new")  # a new inode each time: the reload sees it
    tmp.write_text("".join(f"{u}:{hash_password(p.encode(), ln=ln)}\n" for u, p in users.items()))
    os.replace(tmp, path)
    return str(path)


def _cfg(protocol: str, port: int, creds: str) -> dict[str, Any]:
    rules = [{"name": "backends", "action": "allow",
              "to": {"hosts": ["*.egress.test"], "ports": [port]}}]
    return egress_cfg(protocol, rules, egress={"credentials": creds})


def _proxy(protocol: str, port: int, login: str) -> list[str]:
    if protocol == "socks5":
        return ["--socks5-hostname", f"{login}@127.0.0.1:{port}"]
    return ["-x", f"http://{login}@127.0.0.1:{port}", "--proxytunnel"]


async def _get(tmp_path: Path, name: str, url: str, *proxy: str) -> tuple[int, str]:
    """curl GET through the proxy: (exit code, sha256 of what came)."""
    out = tmp_path / f"out-{name}"
    code, _, err = await run_tool(require_tool("curl"), "-sS", "--max-time", "30", "-o",
                                  str(out), *proxy, url)
    body = out.read_bytes() if out.exists() else b""
    return code, hashlib.sha256(body).hexdigest() if code == 0 else err.decode()


def _socks_login(user: bytes, password: bytes, port: int) -> list[bytes]:
    name = b"app.egress.test"
    return [b"\x05\x01\x02", b"\x01" + bytes([len(user)]) + user + bytes([len(password)])
            + password, b"\x05\x01\x00\x03" + bytes([len(name)]) + name
            + struct.pack(">H", port)]


@pytest.mark.parametrize("protocol", ["socks5", "http_connect"])
async def test_burst_of_first_logins(tmp_path: Path, resolver: FakeResolver, protocol: str,
                                     scrypt_runs: dict[bytes, int]) -> None:
    backend = await HttpBackend(TAIL).start()
    logins = {f"user{i}": f"pw-{i}-{os.urandom(4).hex()}" for i in range(3)}
    creds = _users(tmp_path / "users", logins)
    enforcer = await Enforcer(_cfg(protocol, backend.port, creds)).start()
    async with running(enforcer, backend):
        url = f"http://app.egress.test:{backend.port}/"
        port = enforcer.port()
        clients = [(f"c{i}", f"user{i % 3}:{logins[f'user{i % 3}']}") for i in range(36)]
        results = await asyncio.gather(*(_get(tmp_path, name, url, *_proxy(protocol, port, who))
                                         for name, who in clients))
        want = hashlib.sha256(TAIL).hexdigest()
        assert results == [(0, want)] * 36
        # one scrypt per distinct login: the others joined it or hit the cache
        assert scrypt_runs == {p.encode(): 1 for p in logins.values()}
        recs = await enforcer.wait_flows(36)
        assert all(r["action"] == "allow" and r["egress"]["user"] in logins for r in recs)
        assert egress_errors(enforcer, "timeout", protocol) == 0


async def test_credentials_change_drops_cached_login(tmp_path: Path, resolver: FakeResolver,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     scrypt_runs: dict[bytes, int]) -> None:
    monkeypatch.setattr(credmod, "RECHECK_EVERY", 0.0)
    backend = await HttpBackend(TAIL).start()
    path = tmp_path / "users"
    creds = _users(path, {"alice": "one", "bob": "bee", "carol": "sea"}, ln=8)
    enforcer = await Enforcer(_cfg("socks5", backend.port, creds)).start()
    async with running(enforcer, backend):
        url = f"http://app.egress.test:{backend.port}/"
        port = enforcer.port()
        want = (0, hashlib.sha256(TAIL).hexdigest())
        for who in ["alice:one", "bob:bee", "carol:sea", "alice:one"]:
            assert await _get(tmp_path, "a", url, *_proxy("socks5", port, who)) == want
        assert scrypt_runs == {b"one": 1, b"bee": 1, b"sea": 1}  # the second alice: cached
        # alice's password changes, bob is removed, carol's line stays the same
        carol = next(line for line in path.read_text().splitlines() if line.startswith("carol:"))
        path.with_suffix(".new").write_text(f"alice:{hash_password(b'two', ln=8)}\n{carol}\n")
        os.replace(path.with_suffix(".new"), path)
        for who in ["alice:one", "bob:bee"]:
            code, _ = await _get(tmp_path, "b", url, *_proxy("socks5", port, who))
            assert code != 0, who
        assert await _get(tmp_path, "c", url, *_proxy("socks5", port, "carol:sea")) == want
        assert await _get(tmp_path, "d", url, *_proxy("socks5", port, "alice:two")) == want
        assert scrypt_runs == {b"one": 2, b"bee": 2, b"sea": 1, b"two": 1}
        recs = await enforcer.wait_flows(8)
        assert [r["close"] for r in recs[4:6]] == ["egress_bad_credentials"] * 2
        assert [r["egress"]["user"] for r in recs[6:]] == ["carol", "alice"]


@pytest.mark.parametrize("protocol", ["socks5", "http_connect"])
async def test_wrong_password_flood_is_refused_at_once(tmp_path: Path, resolver: FakeResolver,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       protocol: str) -> None:
    pool = logincheck.ScryptPool(workers=1, waiting=3)
    monkeypatch.setattr(logincheck, "POOL", pool)
    gate = threading.Event()  # holds the flood's checks until the test lets them go
    real = ScryptHash.verify

    def held(self: ScryptHash, password: bytes) -> bool:
        if password.startswith(b"flood"):
            gate.wait(30)
        return real(self, password)

    monkeypatch.setattr(ScryptHash, "verify", held)
    backend = await HttpBackend(TAIL).start()
    creds = _users(tmp_path / "users", {"alice": "s3cret", "bob": "b0b"})
    enforcer = await Enforcer(_cfg(protocol, backend.port, creds)).start()
    try:
        async with running(enforcer, backend):
            url = f"http://app.egress.test:{backend.port}/"
            port = enforcer.port()
            want = (0, hashlib.sha256(TAIL).hexdigest())
            assert await _get(tmp_path, "a", url, *_proxy(protocol, port, "alice:s3cret")) == want
            flood = [_flood(protocol, port, backend.port, i) for i in range(24)]
            tasks = [asyncio.ensure_future(raw_session(port, chunks, pause=0, timeout=40))
                     for chunks in flood]
            await wait_until(lambda: sum(t.done() for t in tasks) == 20)
            done = [t for t in tasks if t.done()]  # refused while 4 checks are held
            assert pool.pending == 4 and egress_errors(enforcer, "login_busy", protocol) == 20
            refusal = b"\x05\x02\x01\x01" if protocol == "socks5" else b"HTTP/1.1 407 "
            assert all(t.result()[0].startswith(refusal) for t in done), done[0].result()
            # the verified user still gets through; a new login is refused (fail closed)
            assert await _get(tmp_path, "b", url, *_proxy(protocol, port, "alice:s3cret")) == want
            code, _ = await _get(tmp_path, "c", url, *_proxy(protocol, port, "bob:b0b"))
            assert code != 0
            gate.set()
            rest = await asyncio.gather(*tasks)
            assert all(got.startswith(refusal) for got, _ in rest)
            recs = await enforcer.wait_flows(27)
            closes = [r["close"] for r in recs]
            assert closes.count("egress_login_busy") == 21 and \
                closes.count("egress_bad_credentials") == 4, closes
            busy = next(r for r in recs if r["close"] == "egress_login_busy")
            assert "login checks unfinished" in busy["detail"] and busy["egress"]["user"] is None
            assert [r["egress"]["user"] for r in recs if r["action"] == "allow"] == ["alice"] * 2
            assert all("flood" not in str(r) for r in recs)
            await wait_until(lambda: pool.pending == 0)
    finally:
        gate.set()


def _flood(protocol: str, port: int, backend: int, i: int) -> list[bytes]:
    password = f"flood-{i}".encode()
    if protocol == "socks5":
        return [b"".join(_socks_login(b"alice", password, backend))]
    auth = base64.b64encode(b"alice:" + password)
    return [f"CONNECT app.egress.test:{backend} HTTP/1.1\r\n".encode()
            + b"Proxy-Authorization: Basic " + auth + b"\r\n\r\n"]
