"""The ``/status`` example in docs/operations.md has the shape of a real ``/status``.

A server with a TLS listener, an upstream, a file flow log and a failed reload answers
``/status``; every mapping in the documented example must have exactly the keys of the
real one at the same place (lists: their first items), so a field added, renamed or
removed in the code fails here until the docs follow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from enforcer.config.loader import load_config
from enforcer.runtime.server import Server
from tests.conftest import Pki
from tests.docs.mdblocks import ROOT, blocks
from tests.e2e.observe_util import admin_port, http_get, wait_until


def documented_status() -> Any:
    page = ROOT / "docs/operations.md"
    found = [b for b in blocks(page) if b.lang == "json" and '"uptime_s"' in b.text]
    assert len(found) == 1, "docs/operations.md shows one /status example"
    return json.loads(found[0].text)


def shape_problems(doc: Any, real: Any, where: str = "") -> list[str]:
    if isinstance(doc, dict) and isinstance(real, dict):
        out = [f"{where}.{k}: documented, not in /status" for k in set(doc) - set(real)]
        out += [f"{where}.{k}: in /status, not documented" for k in set(real) - set(doc)]
        for key in set(doc) & set(real):
            out += shape_problems(doc[key], real[key], f"{where}.{key}")
        return out
    if isinstance(doc, list) and isinstance(real, list) and doc and real:
        return shape_problems(doc[0], real[0], f"{where}[0]")
    return []


async def test_documented_status_has_the_real_shape(pki: Pki, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rulesets: {inbound: {default: allow}}\n")
    raw = {"version": 1, "node": {"name": "docs"},
           "tls": {"mesh": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                            "ca": str(pki.ca)}},
           "listeners": [{"name": "inbound", "listen": "127.0.0.1:0",
                          "tls": {"mode": "terminate", "material": "mesh"},
                          "ruleset": "inbound", "upstream": "app"}],
           "upstreams": {"app": {"address": "127.0.0.1:9"}},
           "rulesets_file": str(rules),
           "flow_log": {"sink": f"file:{tmp_path / 'flows.jsonl'}"},
           "admin": {"listen": "127.0.0.1:0"}}
    config = tmp_path / "enforcer.yaml"
    config.write_text(yaml.safe_dump(raw))
    server = Server(load_config(str(config)))
    server.flowlog.start()
    await server.start()
    try:
        rules.write_text("rulesets: {inbound: {default: maybe}}\n")  # a failed reload
        server.reloader.reload_now()
        await wait_until(lambda: bool(server.status()["reloads"]["rulesets"]["last_error"]),
                         what="the reload to fail")
        real = (await http_get(admin_port(server), "/status")).json()
    finally:
        await server.shutdown()
        server.flowlog.close()
    assert real["reloads"]["rulesets"]["last_error"], "the reload was meant to fail"
    assert shape_problems(documented_status(), real) == []
