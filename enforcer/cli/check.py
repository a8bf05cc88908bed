"""``enforcer check -c FILE``: validate everything a start would, without binding.

Reports every problem at once, one line each with its key path, and exits 2; exit 0 and a
one-line summary when the config would start.
"""

from __future__ import annotations

import argparse
import sys

from enforcer.cli import exitcodes
from enforcer.cli.errors import fail
from enforcer.config.errors import ConfigError
from enforcer.config.loader import is_rulesets_file, load_config, load_rulesets_file
from enforcer.config.model import Config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="validate a config file (exit 2 on any problem)")
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    p.set_defaults(func=cmd_check)


def check_config(path: str) -> tuple[Config | None, list[str]]:
    """Everything ``run`` would check before binding: returns (config, problems)."""
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return None, [str(i) for i in exc.issues]
    return cfg, check_runtime(cfg)


def flow_log_problem(cfg: Config) -> str | None:
    """Why the flow-log file sink cannot be written (``run`` refuses to start too)."""
    from enforcer.observe.flowlog import check_sink_writable

    problem = check_sink_writable(cfg.flow_log)
    return f"flow_log.sink: {problem}" if problem else None


def check_runtime(cfg: Config) -> list[str]:
    from enforcer.dataplane.plane import DataPlane, StartupError
    from enforcer.observe.metrics import NullMetrics

    problems: list[str] = []
    sink_problem = flow_log_problem(cfg)
    if sink_problem:
        problems.append(sink_problem)
    try:
        DataPlane(cfg, metrics=NullMetrics(), flowlog=None).build()
    except StartupError as exc:
        problems.extend(str(exc).splitlines())
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    if is_rulesets_file(args.config):
        return check_rulesets_file(args.config)
    cfg, problems = check_config(args.config)
    if problems:
        for problem in problems:
            fail(problem)
        return exitcodes.BAD_CONFIG
    assert cfg is not None
    print(f"{args.config}: ok ({len(cfg.listeners)} listener(s), {len(cfg.upstreams)} "
          f"upstream(s), {len(cfg.tls)} TLS material(s), {len(cfg.rulesets)} ruleset(s))",
          file=sys.stdout)
    return exitcodes.OK


def check_rulesets_file(path: str) -> int:
    """A file holding only ``rulesets:`` (a ``rulesets_file``, e.g. a ConfigMap's
    rules.yaml) is checked on its own: everything but the listener references, which
    need the config that names the file."""
    try:
        rulesets = load_rulesets_file(path)
    except ConfigError as exc:
        for issue in exc.issues:
            fail(str(issue))
        return exitcodes.BAD_CONFIG
    rules = sum(len(rs.rules) for rs in rulesets.values())
    print(f"{path}: ok (rulesets file: {len(rulesets)} ruleset(s), {rules} rule(s); listener "
          "references are checked with the config that names it)", file=sys.stdout)
    return exitcodes.OK
