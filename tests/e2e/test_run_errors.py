"""`enforcer run` with a broken or missing config (a pod restarting with a bad ConfigMap):
exit 2 with one line per problem naming the file and the key, and a missing file says what
to mount where."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.e2e.proc import enforcer_cmd

GOOD_LISTENER = ("listeners:\n  - name: a\n    listen: 127.0.0.1:0\n    tls: {mode: 'off'}\n"
                 "    ruleset: r\n    upstream: u\n")
REST = "upstreams: {u: {address: '127.0.0.1:9'}}\nrulesets: {r: {default: allow}}\n"


def _run(config: Path) -> tuple[int, list[str]]:
    done = subprocess.run(enforcer_cmd("run", "-c", str(config), "--log-json"),
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr.splitlines()


def test_a_bad_key_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("version: 1\nnode: {name: n}\n" + GOOD_LISTENER + "    bogus: 1\n" + REST)
    code, lines = _run(config)
    assert code == 2
    (line,) = lines
    assert line.startswith(f"enforcer: error: {config}: listeners[0].bogus: unknown key (known: "
                           "name, listen, proxy_protocol, tls, ruleset, upstream")


def test_a_bad_rules_file_names_both_files_and_the_key(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rulesets:\n  r:\n    default: maybe\n")
    config = tmp_path / "config.yaml"
    config.write_text("version: 1\nnode: {name: n}\n" + GOOD_LISTENER
                      + "upstreams: {u: {address: '127.0.0.1:9'}}\n"
                      + f"rulesets_file: {rules}\n")
    code, lines = _run(config)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"enforcer: error: {config}: rulesets_file: {rules}: ")
    assert "rulesets.r.default" in lines[0]


def test_a_missing_config_says_what_to_mount_where(tmp_path: Path) -> None:
    missing = tmp_path / "config" / "config.yaml"
    code, lines = _run(missing)
    assert code == 2
    assert lines == [
        f"enforcer: error: {missing}: cannot read: No such file or directory",
        f"enforcer: error: nothing at {missing}: mount the directory holding config.yaml at "
        f"{missing.parent} (in Kubernetes: the config ConfigMap as a volume there, not with "
        "subPath; see docs/kubernetes.md)"]
