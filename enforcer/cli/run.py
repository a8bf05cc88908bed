"""``enforcer run -c FILE``: serve until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import os

from enforcer.cli import exitcodes
from enforcer.cli.check import flow_log_problem
from enforcer.cli.errors import fail, load_config_or_report
from enforcer.config.model import Config
from enforcer.dataplane.plane import StartupError
from enforcer.observe.logging import setup_logging
from enforcer.runtime import early_signals

STARTUP_EXIT = {"config": exitcodes.BAD_CONFIG, "tls": exitcodes.TLS_MATERIAL,
                "bind": exitcodes.BIND_FAILED}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the proxy from a config file")
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="YAML config file")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-json", action="store_true", help="log lines as JSON on stderr")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    early_signals.hold()  # (already, when started as python -m enforcer)
    setup_logging(args.log_level, json=args.log_json)
    cfg = load_config_or_report(args.config, name_file=True)
    if cfg is None:
        return exitcodes.BAD_CONFIG
    from enforcer.config.loader import resolve_workers

    workers = resolve_workers(cfg)
    worker_spec = os.environ.pop("ENFORCER_WORKER", None)
    if worker_spec is None and (problem := flow_log_problem(cfg)):
        fail(problem)  # as `enforcer check` says: no flow records would ever be written
        return exitcodes.BAD_CONFIG
    try:
        if worker_spec is not None:
            return _run_worker(cfg, worker_spec)
        if workers > 1:
            from enforcer.runtime.supervisor import run_workers

            return run_workers(cfg, workers, _passed_on(args))
        from enforcer.runtime.server import run

        return run(cfg)
    except StartupError as exc:
        fail(str(exc))
        return STARTUP_EXIT.get(exc.kind, exitcodes.FAILURE)


def _passed_on(args: argparse.Namespace) -> list[str]:
    out = ["--log-level", args.log_level]
    return [*out, "--log-json"] if args.log_json else out


def _run_worker(cfg: Config, spec: str) -> int:
    """A worker process started by the supervisor (``workers`` > 1)."""
    from enforcer.runtime.server import Server, run
    from enforcer.runtime.supervisor import worker_sockets, worker_ticket_secret
    from enforcer.runtime.workerstatus import status_file

    secret = worker_ticket_secret(spec)
    _, sockets, ready_file = worker_sockets(spec)
    status = status_file(spec)

    def serving(server: Server) -> None:
        if status is not None:
            server.publish_status(status)  # there before the supervisor counts it ready
        # the ready file is also where this worker's heartbeat goes (the supervisor's /healthz)
        ready_file.touch()
        server.heartbeat.publish_to(ready_file)

    return run(cfg, sockets=sockets, admin=False, shared_flowlog=True, ticket_secret=secret,
               on_ready=serving)
