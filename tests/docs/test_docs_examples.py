"""Every example in the documentation is executed, so the docs cannot rot.

- YAML: a whole config (top-level ``version``) goes through ``enforcer check`` next to a
  ``pki/`` made by ``enforcer certs init``; a ``fragment`` is merged into a small valid
  config first; a ``rulesets`` file is checked on its own; ``other`` YAML, and Kubernetes
  objects (every document has ``apiVersion`` and ``kind``), are parsed.
- Shell: blocks marked ``run`` are run with bash in a fresh copy of ``config/`` and
  ``deploy/``, in order, per page; an ``output`` block's lines must be in the output of the
  run before it. Every ``enforcer`` and ``make`` command of unmarked shell blocks must at
  least parse (known subcommand and options; known Makefile target).
- JSON blocks parse (one document, or several in a row, as flow records are shown).

The markers are described in ``mdblocks``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from enforcer.cli.main import build_parser
from tests.docs.mdblocks import DOCS, ROOT, Block, all_blocks, blocks

BLOCKS = all_blocks()
YAML_BLOCKS = [b for b in BLOCKS if b.lang in ("yaml", "yml")]
RUN_PAGES = sorted({b.path for b in BLOCKS if b.marker.startswith("run")})
SH_LANGS = ("sh", "bash", "shell", "console")
BASE: dict[str, Any] = {
    "version": 1,
    "tls": {"mesh": {"cert": "pki/server.crt", "key": "pki/server.key", "ca": "pki/ca.crt"}},
    "listeners": [{"name": "in", "listen": "127.0.0.1:0",
                   "tls": {"mode": "terminate", "material": "mesh"},
                   "ruleset": "all", "upstream": "app"}],
    "upstreams": {"app": {"address": "127.0.0.1:8080"}},
    "rulesets": {"all": {"default": "allow"}},
}
LISTENER_DEFAULTS: dict[str, Any] = {"listen": "127.0.0.1:0", "tls": {"mode": "off"},
                                     "ruleset": "all", "upstream": "app"}
UPSTREAM_DEFAULTS: dict[str, Any] = {"address": "127.0.0.1:8080"}


def _ids(items: list[Any]) -> list[str]:
    return [i.where if isinstance(i, Block) else str(i.relative_to(ROOT)) for i in items]


def enforcer(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "enforcer", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def demo_pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("pki")
    done = enforcer("certs", "init", "pki", cwd=base)
    assert done.returncode == 0, done.stderr
    return base / "pki"


def _merge(base: Any, part: Any) -> Any:
    """``part`` over ``base``: mappings key by key; listeners by name (a new one gets
    defaults so that only the keys the fragment is about need to be written)."""
    if isinstance(base, dict) and isinstance(part, dict):
        out = dict(base)
        for key, value in part.items():
            if key == "upstreams" and isinstance(value, dict):
                value = {n: _merge(UPSTREAM_DEFAULTS, u) for n, u in value.items()}
            out[key] = _merge(base[key], value) if key in base else value
        return out
    if isinstance(base, list) and isinstance(part, list) and all(
            isinstance(x, dict) and "name" in x for x in base + part):
        merged = {x["name"]: x for x in base}
        for x in part:
            merged[x["name"]] = _merge(merged.get(x["name"], LISTENER_DEFAULTS), x)
        return list(merged.values())
    return part


def _check(doc: Any, tmp_path: Path, pki: Path, block: Block) -> None:
    shutil.copytree(pki, tmp_path / "pki")
    path = tmp_path / "enforcer.yaml"
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    done = enforcer("check", "-c", str(path), cwd=tmp_path)
    assert done.returncode == 0, f"{block.where}: enforcer check failed:\n{done.stderr}"


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=_ids(YAML_BLOCKS))
def test_yaml_example(block: Block, tmp_path: Path, demo_pki_dir: Path) -> None:
    docs = list(yaml.safe_load_all(block.text))
    if docs and all(isinstance(d, dict) and {"apiVersion", "kind"} <= set(d) for d in docs):
        return  # Kubernetes objects: parsed (deploy/ has the manifests the tests apply)
    assert len(docs) == 1, f"{block.where}: several YAML documents that are not Kubernetes objects"
    doc = docs[0]
    kind = block.marker.split()[0] if block.marker else ""
    if kind == "other":
        assert doc is not None and "(" in block.marker, \
            f"{block.where}: say whose YAML it is: <!-- doctest: other (Prometheus) -->"
        return
    if kind == "rulesets":
        assert list(doc) == ["rulesets"], f"{block.where}: a rulesets file has one key"
        _check(block.text, tmp_path, demo_pki_dir, block)
        return
    if kind == "fragment":
        _check(_merge(copy.deepcopy(BASE), doc), tmp_path, demo_pki_dir, block)
        return
    assert kind == "" and isinstance(doc, dict) and "version" in doc, (
        f"{block.where}: a YAML block is a whole enforcer config (version: 1) or is marked "
        "<!-- doctest: fragment | rulesets | other (whose) -->")
    _check(block.text, tmp_path, demo_pki_dir, block)


def _workspace(tmp_path: Path) -> Path:
    for name in ("config", "deploy"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("pki"))
    return tmp_path


def run_script(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """bash in a process group of its own, which is killed once bash has exited: an
    example that starts ``enforcer run &`` and fails half-way leaves nothing running.
    Output goes to files, not pipes, which a leftover child would hold open."""
    out_path, err_path = cwd / ".doctest.out", cwd / ".doctest.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, text=True, stdout=out,
                                stderr=err, start_new_session=True)
        try:
            proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_path.read_text(),
                                       err_path.read_text())


@pytest.mark.parametrize("page", RUN_PAGES, ids=_ids(RUN_PAGES))
def test_runnable_shell_blocks(page: Path, tmp_path: Path) -> None:
    cwd = _workspace(tmp_path)
    bin_dir = tmp_path / ".bin"  # `enforcer` as installed: a program on PATH ($! is its pid)
    bin_dir.mkdir()
    (bin_dir / "enforcer").write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m enforcer "$@"\n')
    (bin_dir / "enforcer").chmod(0o755)
    prelude = f'set -euo pipefail\nexport PATH={shlex.quote(str(bin_dir))}:"$PATH"\n'
    last_output: str | None = None
    for block in blocks(page):
        if block.marker.startswith("run"):
            assert block.lang in SH_LANGS, f"{block.where}: only shell blocks run"
            m = re.search(r"exit=(\d+)", block.marker)
            want = int(m.group(1)) if m else 0
            done = run_script(prelude + block.text, cwd)
            last_output = done.stdout + done.stderr
            assert done.returncode == want, (
                f"{block.where}: exit {done.returncode}, expected {want}\n{last_output}")
        elif block.marker == "output":
            assert last_output is not None, f"{block.where}: output before any run block"
            for line in block.text.splitlines():
                if line.strip():
                    assert line.strip() in last_output, f"{block.where}: {line!r} not printed"


def _commands(text: str) -> list[list[str]]:
    """Shell lines, continuations joined, comments dropped, split into words."""
    text = re.sub(r"<<-?'?(\w+)'?\n.*?^\1$", "", text, flags=re.S | re.M)  # here-documents
    out: list[list[str]] = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        lexer.whitespace_split = True
        words: list[str] = []
        for word in lexer:  # a command ends at an operator (|, &&, ;, &, >, 2>)
            if set(word) <= set("|&;<>()"):
                if word[0] in "<>" and words and words[-1].isdigit():
                    words.pop()  # the 2 of 2>
                if words:
                    out.append(words)
                words = []
            else:
                words.append(word)
        if words:
            out.append(words)
    return out


SH_BLOCKS = [b for b in BLOCKS if b.lang in SH_LANGS]


@pytest.mark.parametrize("block", SH_BLOCKS, ids=_ids(SH_BLOCKS))
def test_shell_commands_exist(block: Block) -> None:
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    text = block.text
    if block.lang == "console":  # commands are the lines after a "$ " prompt
        text = "\n".join(ln[2:] for ln in text.splitlines() if ln.startswith("$ "))
    for words in _commands(text):
        if words[0] == "enforcer":
            try:
                build_parser().parse_args(words[1:])
            except SystemExit as exc:
                assert exc.code == 0, f"{block.where}: {shlex.join(words)} does not parse"
        elif words[0] == "make":
            for word in words[1:]:
                if "=" not in word:
                    assert word in targets, f"{block.where}: no Makefile target {word!r}"


JSON_BLOCKS = [b for b in BLOCKS if b.lang == "json"]


@pytest.mark.parametrize("block", JSON_BLOCKS, ids=_ids(JSON_BLOCKS))
def test_json_example_parses(block: Block) -> None:
    decoder, text, pos, docs = json.JSONDecoder(), block.text.strip(), 0, 0
    while pos < len(text):
        try:
            _, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{block.where}: not JSON: {exc}") from None
        docs += 1
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    assert docs >= 1


def test_every_page_has_examples_checked() -> None:
    """The markers are found at all (a typo in the marker syntax would skip everything)."""
    assert RUN_PAGES, "no runnable shell block found"
    assert any(b.marker == "fragment" for b in YAML_BLOCKS)
    assert any(b.marker == "output" for b in BLOCKS)
    assert len(DOCS) >= 8
