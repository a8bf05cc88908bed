"""Reload rulesets and TLS material on SIGHUP and when their files change.

What is watched. Each kind of state has its own files: rulesets come from the config file
(``cfg.source``, for inline ``rulesets:``) and the ``rulesets_file``; TLS material from
the files each material was read from, and from the SPIFFE Workload API's updates
(``tlsconf.spiffe``: a counter polled like a file signature). Watching is a cheap poll
(once a second) of ``stat()`` signatures (mtime, ctime, size, inode, device). ``stat``
follows symlinks, so the Kubernetes ConfigMap/Secret update (files written to a new
``..2026_11_23_...`` directory, then the ``..data`` symlink renamed over atomically, with
``rules.yaml -> ..data/rules.yaml`` unchanged) shows up as a new inode of the watched path.

When. A poll reloads only the kinds whose files changed; SIGHUP reloads both. The
signatures are taken *before* the files are read, so a file that changes again while (or
just after) it is read is seen as changed at the next poll: a half-written file fails to
parse, keeps the last good state, and the complete file is loaded a second later.

How. A reload builds the new state on the side (parse, validate, check the rules against
the running listeners, compile; load material, build SSL contexts) and swaps it in for new
connections only when all of it succeeded. Otherwise the last good state stays, and the
error (with its key path) is logged, counted in ``enforcer_reloads_total{kind,
result="error"}`` and shown in ``/status`` under ``reloads``. Every attempt is counted,
also one that finds the same rules or material bytes (``result="ok"``: SIGHUP, or a file
touched without a change); a poll that finds no file changed attempts nothing. Changes to
anything but rulesets in the config file need a restart; a reload says so in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from enforcer.config.errors import ConfigError, ConfigIssue
from enforcer.config.loader import load_config, load_rulesets_file, rule_reference_issues
from enforcer.config.model import Config
from enforcer.config.rulesets import RulesetConfig
from enforcer.dataplane.tasks import spawn
from enforcer.policy import compile_rulesets
from enforcer.runtime.tlsreload import reload_tls_material, rotate_ticket_keys
from enforcer.tlsconf import spiffe
from enforcer.tlsconf.material import MaterialError

if TYPE_CHECKING:
    from enforcer.runtime.server import Server

log = logging.getLogger("enforcer.reload")

POLL_INTERVAL = 1.0
KINDS = ("rulesets", "tls")
Signature = tuple[int, int, int, int, int] | None


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)


class Reloader:
    def __init__(self, server: Server, *, interval: float = POLL_INTERVAL) -> None:
        self.server = server
        self.interval = interval
        self.last: dict[str, dict[str, Any]] = {}
        self.rulesets_file = server.cfg.rulesets_file  # follows the config file on reload
        self.rulesets: Mapping[str, RulesetConfig] = server.cfg.rulesets  # last good
        self._inline = self._inline_rulesets(server.cfg)
        self._task: asyncio.Task[None] | None = None
        self._sigs: dict[str, Signature] = {}
        self._spiffe_seen = spiffe.generation()  # SVID updates count as changed TLS files

    # ------------------------------------------------------------------ watching
    def start(self) -> None:
        self._sigs = {p: _signature(p) for paths in self.watched().values() for p in paths}
        self._task = spawn(self._watch(), name="reload-watch")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def watched(self) -> dict[str, list[str]]:
        """kind -> the files its state was built from."""
        cfg = self.server.cfg
        tls: list[str] = []
        for material in self.server.plane.materials.values():
            tls.extend(material.sources)
        return {"rulesets": [p for p in (cfg.source, self.rulesets_file) if p], "tls": tls}

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll()
                if self.server.plane.ticket_keys_due():  # the wall clock's next hour
                    rotate_ticket_keys(self.server)  # new listener contexts, new ticket keys
            except Exception:  # a bug must not stop the watching
                log.exception("reload poll failed")

    def poll(self) -> list[str]:
        """Reload the kinds whose files changed since the last look; returns them."""
        kinds = []
        for kind, paths in self.watched().items():
            changed = [p for p in paths if _signature(p) != self._sigs.get(p)]
            if changed:
                log.info("%s files changed: %s", kind, ", ".join(changed))
                kinds.append(kind)
        seen, self._spiffe_seen = self._spiffe_seen, spiffe.generation()
        if seen != self._spiffe_seen and "tls" not in kinds:
            log.info("tls: a new X.509 SVID or trust bundle from the SPIFFE Workload API")
            kinds.append("tls")
        self._reload(kinds)
        return kinds

    def reload_now(self) -> None:
        """SIGHUP: reload everything."""
        log.info("SIGHUP: reloading rulesets and TLS material")
        self._reload(list(KINDS))

    def _reload(self, kinds: list[str]) -> None:
        for kind in kinds:
            before = {p: _signature(p) for p in self.watched()[kind]}
            if kind == "rulesets":
                self.reload_rulesets()
            else:
                self.reload_tls()
            self._sigs.update(before)
            for path in self.watched()[kind]:  # e.g. a rulesets_file the new config names
                self._sigs.setdefault(path, _signature(path))

    # ------------------------------------------------------------------ rulesets
    def reload_rulesets(self) -> bool | None:
        """Read, check and compile the rulesets; swap them in if all went well. Returns
        None when there is nothing to reload from (no config file, no rulesets file)."""
        cfg = self.server.cfg
        if cfg.source is None and self.rulesets_file is None:
            return None
        try:
            fresh, rulesets_file = self._read_rulesets()
            _check_against_running(fresh, cfg)
            compiled = compile_rulesets(fresh)
        except ConfigError as exc:
            return self._result("rulesets", False, "; ".join(str(i) for i in exc.issues))
        except Exception as exc:  # a bug must not take the process down
            log.exception("rulesets reload failed")
            return self._result("rulesets", False, f"{type(exc).__name__}: {exc}")
        self.rulesets_file = rulesets_file
        if fresh == self.rulesets:
            return self._result("rulesets", True, None, note="unchanged")
        self.server.plane.swap_rulesets(compiled)
        self.rulesets = fresh
        return self._result("rulesets", True, None,
                            note=", ".join(f"{n} ({len(r.rules)} rules)" for n, r in fresh.items()))

    def _read_rulesets(self) -> tuple[dict[str, RulesetConfig], str | None]:
        cfg = self.server.cfg
        if cfg.source is not None:
            new = load_config(cfg.source)
            _warn_about_restart(cfg, new)
            return dict(new.rulesets), new.rulesets_file
        assert self.rulesets_file is not None
        from_file = load_rulesets_file(self.rulesets_file)
        both = sorted(set(from_file) & set(self._inline))
        if both:
            raise ConfigError([ConfigIssue("rulesets_file", f"ruleset {n!r} is defined both "
                                           f"inline and in {self.rulesets_file}") for n in both])
        return {**self._inline, **from_file}, self.rulesets_file

    @staticmethod
    def _inline_rulesets(cfg: Config) -> dict[str, RulesetConfig]:
        """Without a config file to read again (a ``Config`` built in memory), the inline
        rulesets are the ones the rulesets file does not define."""
        if cfg.source is not None or cfg.rulesets_file is None:
            return dict(cfg.rulesets)
        try:
            in_file = load_rulesets_file(cfg.rulesets_file)
        except ConfigError:
            in_file = {}
        return {n: r for n, r in cfg.rulesets.items() if n not in in_file}

    # ------------------------------------------------------------------ TLS material
    def reload_tls(self) -> bool:
        try:
            changed = reload_tls_material(self.server)
        except (MaterialError, ValueError) as exc:
            return self._result("tls", False, str(exc))
        except Exception as exc:  # a bug must not take the process down
            log.exception("TLS reload failed")
            return self._result("tls", False, f"{type(exc).__name__}: {exc}")
        if not changed:  # an attempt all the same (SIGHUP, a touched file), as for rulesets
            again = self.last.get("tls", {}).get("result") == "error"  # the good files are back
            return self._result("tls", True, None, note="the files hold the running material "
                                "again" if again else "unchanged")
        return self._result("tls", True, None, note=", ".join(changed))

    # ------------------------------------------------------------------ reporting
    def _result(self, kind: str, ok: bool, error: str | None, note: str = "") -> bool:
        self.server.metrics.reloads_total.labels(kind=kind, result="ok" if ok else "error").inc()
        now = time.time()
        entry = self.last.setdefault(kind, {"last_ok": None, "last_error": None})
        entry["last_attempt"] = now
        entry["result"] = "ok" if ok else "error"
        entry["files"] = self.watched()[kind]
        if ok:
            entry["last_ok"] = now
            entry["last_error"] = None
            log.info("reloaded %s: %s", kind, note or "ok")
        else:
            entry["last_error"] = error
            log.error("reload of %s failed, keeping the last good %s: %s", kind, kind, error)
        return ok

    def status(self) -> dict[str, Any]:
        return self.last


def _check_against_running(fresh: Mapping[str, RulesetConfig], cfg: Config) -> None:
    """The new rulesets must serve the listeners that are running now (which a reload
    does not change), whatever the config file says today."""
    issues = [ConfigIssue(f"listeners[{i}].ruleset", f"ruleset {lst.ruleset!r} used by the "
                          f"running listener {lst.name!r} is missing")
              for i, lst in enumerate(cfg.listeners) if lst.ruleset not in fresh]
    issues += rule_reference_issues(fresh, cfg.listeners, cfg.upstreams, inline=fresh.keys(),
                                    rulesets_file=None)
    if issues:
        raise ConfigError(issues)


def _warn_about_restart(running: Config, new: Config) -> None:
    same = dataclasses.replace(new, rulesets=running.rulesets, rulesets_file=running.rulesets_file,
                               source=running.source)
    if same != running:
        changed = [f.name for f in dataclasses.fields(Config)
                   if getattr(same, f.name) != getattr(running, f.name)]
        log.warning("config file changes outside rulesets (%s) take effect at the next "
                    "restart; only rulesets were reloaded", ", ".join(changed))
