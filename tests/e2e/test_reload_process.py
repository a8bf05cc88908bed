"""Reload in a real ``enforcer run`` process: the rules file changes under it (its own
1-second watcher notices), SIGHUP reloads, a broken file keeps the last good rules, and a
connection open across all of it keeps relaying."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from tests.e2e.harness import Backend, inbound_cfg, random_bytes, sha
from tests.e2e.policy_util import close_quietly, wait_until, write_rules
from tests.e2e.proc import EnforcerProcess, write_config


def rules(*allow_from: str, deny_from: str | None = None) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    if deny_from:
        out.append({"name": f"never-{deny_from}", "action": "deny",
                    "from": {"cidrs": [f"{deny_from}/32"]}})
    out += [{"name": f"from-{ip}", "action": "allow", "from": {"cidrs": [f"{ip}/32"]}}
            for ip in allow_from]
    return {"inbound": {"default": "deny", "rules": out}}


async def plain_exchange(port: int, source: str) -> bool:
    """True if 100 kB went through the echo backend and back intact; False if refused."""
    payload = random_bytes(100_000)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    got = b""
    try:
        writer.write(payload)
        writer.write_eof()
        async with asyncio.timeout(30):
            got = await reader.read()
    except ConnectionError:
        pass
    finally:
        await close_quietly(writer)
    assert got in (b"", payload), "partial relay"
    return sha(got) == sha(payload)


def log_count(proc: EnforcerProcess, text: str) -> int:
    return sum(text in line for line in list(proc.stderr_lines))


async def test_rules_file_change_sighup_and_broken_file(pki: Any, tmp_path: Path) -> None:
    backend = await Backend(mode="echo").start()
    rules_file = write_rules(tmp_path / "rules.yaml", rules("127.0.0.1"))
    cfg = inbound_cfg(pki, backend.port, mode="off", client_auth="none",
                      limits={"drain_timeout": "2s"})
    del cfg["rulesets"]
    cfg["rulesets_file"] = "rules.yaml"  # relative to the config file
    proc = EnforcerProcess(write_config(tmp_path / "enforcer.yaml", cfg))
    try:
        port = (await asyncio.to_thread(proc.wait_bound))["inbound"]
        assert await plain_exchange(port, "127.0.0.1")
        assert not await plain_exchange(port, "127.0.0.2")

        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # stays open
        first = random_bytes(50_000)
        writer.write(first)
        assert sha(await reader.readexactly(len(first))) == sha(first)

        write_rules(rules_file, rules("127.0.0.2", deny_from="127.0.0.1"))
        await wait_until(lambda: log_count(proc, "reloaded rulesets") == 1)
        assert not await plain_exchange(port, "127.0.0.1")
        assert await plain_exchange(port, "127.0.0.2")

        broken = rules("127.0.0.3")
        broken["inbound"]["rules"][0]["from"]["cidrs"] = ["127.0.0.300/32"]
        write_rules(rules_file, broken)
        failed = "reload of rulesets failed, keeping the last good rulesets"
        await wait_until(lambda: log_count(proc, failed) == 1)
        line = next(x for x in proc.stderr_lines if failed in x)
        assert f"{rules_file}: rulesets.inbound.rules[0].from.cidrs[0]: bad CIDR " \
               "'127.0.0.300/32'" in line
        assert not await plain_exchange(port, "127.0.0.1")
        assert await plain_exchange(port, "127.0.0.2")

        proc.proc.send_signal(signal.SIGHUP)  # the watcher does not retry an unchanged file
        await wait_until(lambda: log_count(proc, failed) == 2)
        assert log_count(proc, "SIGHUP") == 1

        more = random_bytes(50_000)  # the open connection kept its decision throughout
        writer.write(more)
        assert sha(await reader.readexactly(len(more))) == sha(more)
        await close_quietly(writer)

        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        proc.stop()
        await backend.close()

    flows = [json.loads(x) for x in proc.stdout_lines if x.startswith("{")]
    decided = [(f["client"]["ip"], f["action"], f["rule"]) for f in flows]
    assert decided.count(("127.0.0.1", "allow", "from-127.0.0.1")) == 2
    assert decided.count(("127.0.0.2", "deny", None)) == 1
    assert decided.count(("127.0.0.1", "deny", "never-127.0.0.1")) == 2
    assert decided.count(("127.0.0.2", "allow", "from-127.0.0.2")) == 2
    assert len(decided) == 7
    assert backend.connections == 4  # the allowed ones only
