"""`enforcer check`: every kind of bad config gives its message with a key path, exit 2."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from enforcer.cli.main import main
from tests.e2e.harness import inbound_cfg, outbound_cfg
from tests.e2e.proc import enforcer_cmd, write_config

REPO = Path(__file__).resolve().parents[2]


def _base(pki: Any) -> dict[str, Any]:
    return inbound_cfg(pki, 8080)


def _mutate(cfg: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(cfg)
    node: Any = cfg
    keys = path.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if key.isdigit() else node[key]
    last = keys[-1]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return cfg


CASES = [
    ("unknown top key", "tlss", {}, "tlss: unknown key"),
    ("unknown listener key", "listeners.0.lisen", "127.0.0.1:1",
     "listeners[0].lisen: unknown key (did you mean 'listen'?)"),
    ("bad duration", "limits", {"idle_timeout": "10 minutes"},
     "limits.idle_timeout: bad duration '10 minutes'"),
    ("bad address", "listeners.0.listen", "localhost", "listeners[0].listen: bad address"),
    ("bad port", "upstreams.app.address", "127.0.0.1:70000", "upstreams.app.address: port 70000"),
    ("unknown material", "listeners.0.tls.material", "mesh2",
     "listeners[0].tls.material: unknown material 'mesh2' (known: mesh)"),
    ("unknown upstream", "listeners.0.upstream", "nope",
     "listeners[0].upstream: unknown upstream 'nope' (known: app)"),
    ("unknown ruleset", "listeners.0.ruleset", "nope",
     "listeners[0].ruleset: unknown ruleset 'nope' (known: inbound)"),
    ("bad enum", "listeners.0.tls.client_auth", "sometimes",
     "listeners[0].tls.client_auth: must be one of required, optional, none"),
    ("bad relay", "relay", "fast", "relay: must be one of auto, native, python; got 'fast'"),
    ("bad timeout_close", "limits", {"timeout_close": "reset"},
     "limits.timeout_close: must be one of fin, rst; got 'reset'"),
    ("missing version", "version", KeyError, "version: is required"),
    ("wrong version", "version", 2, "version: unsupported version 2"),
    ("missing file", "tls.mesh.cert", "/nonexistent/tls.crt",
     "tls.mesh.cert: /nonexistent/tls.crt: no such file"),
    ("proxy without trusted", "listeners.0.proxy_protocol", {"accept": "required"},
     "listeners[0].proxy_protocol.trusted_sources: accept: required needs trusted_sources"),
    ("bad cidr", "listeners.0.proxy_protocol",
     {"accept": "required", "trusted_sources": ["10.0.0.0/33"]},
     "listeners[0].proxy_protocol.trusted_sources[0]: bad CIDR '10.0.0.0/33'"),
]


@pytest.mark.parametrize(("name", "path", "value", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_config(tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str], name: str,
                    path: str, value: Any, expected: str) -> None:
    cfg = _mutate(_base(pki), path, value) if "." in path or value is KeyError or path in (
        "version", "limits") else {**_base(pki), path: value}
    file = write_config(tmp_path / "c.yaml", cfg)
    assert main(["check", "-c", str(file)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert all(line.startswith("enforcer: error: ") for line in err.splitlines())


def test_key_not_matching_certificate(tmp_path: Path, pki: Any,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _mutate(_base(pki), "tls.mesh.key", str(pki.client.key))
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    assert "tls.mesh.key: the private key does not match the certificate" in capsys.readouterr().err


def test_unreadable_and_garbage_pem(tmp_path: Path, pki: Any,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    cfg = _mutate(_base(pki), "tls.mesh.cert", str(garbage))
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    assert "tls.mesh.cert: no PEM certificate found (not PEM)" in capsys.readouterr().err


def test_invalid_yaml_names_line_and_column(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("version: 1\nlisteners:\n  - name: a\n    listen: [oops\n")
    assert main(["check", "-c", str(file)]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML at line" in err and "column" in err


@pytest.mark.parametrize("command", ["check", "run"])
def test_yaml_nested_too_deeply_is_one_line_exit_2(tmp_path: Path, command: str) -> None:
    """PyYAML builds nested collections recursively: 5,000 levels is bad input, not a
    RecursionError traceback."""
    file = tmp_path / "deep.yaml"
    file.write_text("version: 1\nnode: " + "[" * 5000 + "]" * 5000 + "\n")
    res = subprocess.run(enforcer_cmd(command, "-c", str(file)), capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"enforcer: error: {file}: invalid YAML: nested too deeply"]


def test_a_broken_rulesets_file_reports_only_its_own_problems(
        tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Not also "unknown ruleset" for every listener using a ruleset the file defines."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rulesets:\n  inbound:\n    default: maybe\n")
    cfg = _base(pki)
    del cfg["rulesets"]
    cfg["rulesets_file"] = str(rules)
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"enforcer: error: rulesets_file: {rules}: rulesets.inbound.default: must be one of "
        "allow, deny; got 'maybe'"]


def test_relative_unix_socket_paths_are_relative_to_the_config_file(
        tmp_path: Path, pki: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from enforcer.config.loader import load_config

    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    cfg = _mutate(_base(pki), "listeners.0.listen", "unix:run/in.sock")
    cfg = _mutate(cfg, "upstreams.app.address", "unix:../app.sock")
    path = write_config(conf_dir / "c.yaml", cfg)
    monkeypatch.chdir("/")  # not where the config is
    loaded = load_config(str(path))
    assert loaded.listeners[0].listen.path == str(conf_dir / "run" / "in.sock")
    assert loaded.upstreams["app"].address.path == str(tmp_path / "app.sock")


@pytest.mark.parametrize("key", ["listeners.0.listen", "upstreams.app.address"])
def test_a_unix_socket_path_too_long_for_a_socket_address(
        tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str], key: str) -> None:
    """`check` says so (naming the key), instead of `run` failing to bind or connect."""
    long_path = "/tmp/" + "s" * 110 + ".sock"
    cfg = _mutate(_base(pki), key, f"unix:{long_path}")
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err.splitlines()
    key_path = key.replace(".0.", "[0].")
    assert err == [f"enforcer: error: {key_path}: unix socket path {long_path} is "
                   f"{len(long_path)} bytes; at most 107 fit in a socket address"]


def test_every_problem_reported_at_once(tmp_path: Path, pki: Any,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _mutate(_base(pki), "listeners.0.tls.material", "mesh2")
    cfg = _mutate(cfg, "listeners.0.upstream", "nope")
    cfg["limits"] = {"connect_timeout": "soon"}
    assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) >= 3


def test_good_configs_pass(tmp_path: Path, pki: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for cfg in (_base(pki), outbound_cfg(pki, 15006)):
        assert main(["check", "-c", str(write_config(tmp_path / "c.yaml", cfg))]) == 0
        assert ": ok (" in capsys.readouterr().out


EXAMPLES = sorted(p for p in (REPO / "config").glob("*.yaml") if not p.name.endswith(".rules.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_shipped_examples_pass_check(tmp_path: Path, example: Path) -> None:
    # The examples name pki/ beside them: make it the way docs/getting-started.md says.
    shutil.copy(example, tmp_path / example.name)
    for extra in (REPO / "config").glob("*.rules.yaml"):
        shutil.copy(extra, tmp_path / extra.name)
    init = subprocess.run(enforcer_cmd("certs", "init", str(tmp_path / "pki")),
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    out = subprocess.run(enforcer_cmd("check", "-c", str(tmp_path / example.name)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
