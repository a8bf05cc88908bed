"""Shared fixtures: uvloop for every async test, a generated PKI, and tool discovery."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from enforcer.tlsconf.certs import DemoPki, init_demo_pki, issue


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Every async test runs on uvloop, the loop enforcer runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


class Pki:
    """The demo PKI plus a few extra identities used by tests."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.demo: DemoPki = init_demo_pki(base)
        self.ca = self.demo.ca
        self.server = self.demo.server
        self.client = self.demo.client
        self.rogue_client = self.demo.rogue_client
        self.other = issue(base, base / "other", name="other",
                           spiffe_id="spiffe://enforcer.demo/ns/other/sa/intruder",
                           dns=["localhost"])


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


TOOL_VENVS = Path(__file__).resolve().parent.parent / ".tools"


def require_tool(name: str) -> str:
    """An external program's path: from the tool virtualenv that `make
    .tools/NAME/.installed` builds from requirements/tools/NAME.lock, else on PATH or in
    /usr/sbin; the test is skipped when there is none."""
    path = (shutil.which(name, path=str(TOOL_VENVS / name / "bin")) or shutil.which(name)
            or shutil.which(name, path="/usr/sbin:/sbin"))
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it)")
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


@pytest.fixture(params=["own", "openssl"])
def tls_records(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test with the native pump protecting TLS 1.3 records itself once a handshake
    is over (the default), and again with OpenSSL keeping every end."""
    from enforcer.dataplane import native

    if native.module() is None:
        pytest.skip(native.unavailable_reason())
    was = native.own_records()
    native.own_records(request.param == "own")
    try:
        yield str(request.param)
    finally:
        native.own_records(was)


@pytest.fixture(params=["native", "python"])
def relay_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the native relay pump and again with the Python relay."""
    from tests.e2e import harness

    monkeypatch.setattr(harness, "RELAY", request.param)
    return str(request.param)
