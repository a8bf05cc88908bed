"""``enforcer policy replay``: what would a candidate ruleset decide differently for the
flows that were recorded?

Reads flow-log files (JSON lines, ``-`` for stdin) line by line, re-decides every flow
record that holds a decision (``enforcer.policy.replay``) and prints the flows whose action
would change, grouped by the candidate rule that decides them, plus the flows it cannot
re-decide and why. Exit 0: nothing changes; 1: some flow changes or cannot be re-decided;
2: bad input (candidate config, unreadable or malformed flow log; each malformed line is
reported with its file and line number).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from contextlib import ExitStack
from typing import IO, Any

import orjson

from enforcer.cli import exitcodes
from enforcer.cli.errors import fail, load_config_or_report
from enforcer.config.errors import ConfigError
from enforcer.config.loader import is_rulesets_file, load_rulesets_file
from enforcer.policy.replay import (
    MAX_LINE,
    Candidate,
    Group,
    IdentityCache,
    RecordedFlow,
    ReplayInputError,
    ReplayReport,
    Skipped,
    parse_line,
    split_lines,
)

MAX_ERRORS = 10  # malformed lines reported before giving up (or, when skipping, shown)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "replay", help="re-decide recorded flows with a candidate ruleset",
        description="Re-decide the flows of flow-log files with a candidate config (or "
                    "rulesets file) and show which would change from allowed to denied and "
                    "the reverse, grouped by the rule that decides. Exit 0 when nothing "
                    "changes, 1 when something does (or cannot be re-decided), 2 for bad "
                    "input.")
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="candidate config, or a rulesets-only file")
    p.add_argument("--flows", required=True, action="append", metavar="FILE",
                   help="flow-log file (JSON lines); '-' for stdin; repeatable")
    p.add_argument("--examples", type=int, default=3, metavar="N",
                   help="example flows shown per group (default 3)")
    p.add_argument("--skip-malformed", action="store_true",
                   help="report malformed lines as warnings and go on (default: exit 2)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    if args.examples < 0:
        fail(f"--examples {args.examples}: must be 0 or more")
        return exitcodes.USAGE
    candidate = _candidate(args.config)
    if candidate is None:
        return exitcodes.BAD_CONFIG
    report = ReplayReport(examples=args.examples)
    errors = _replay_files(args.flows, candidate, report, args.skip_malformed)
    if errors is None:
        return exitcodes.BAD_CONFIG
    if args.format == "json":
        sys.stdout.write(orjson.dumps(report_json(report, errors),
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for line in format_report(report, args.config):
            print(line)
    if report.replayed == 0:
        print("enforcer: warning: no flow record with a decision was found", file=sys.stderr)
    changed = report.changed or report.not_decided
    return exitcodes.DENY if changed else exitcodes.OK


def _candidate(path: str) -> Candidate | None:
    try:
        if is_rulesets_file(path):
            return Candidate(load_rulesets_file(path))
        cfg = load_config_or_report(path)
        if cfg is None:
            return None
        return Candidate(cfg.rulesets, {lst.name: lst for lst in cfg.listeners}, cfg.upstreams)
    except ConfigError as exc:
        for issue in exc.issues:
            fail(str(issue))
    except ValueError as exc:  # a pattern only a hand-built config can hold
        fail(f"{path}: {exc}")
    return None


def _replay_files(paths: list[str], candidate: Candidate, report: ReplayReport,
                  skip: bool) -> int | None:
    """Replay every file into ``report``; the number of malformed lines skipped, or None
    after reporting bad input."""
    identities = IdentityCache()
    malformed = 0
    with ExitStack() as stack:
        for path in paths:
            stream = _open(path, stack)
            if stream is None:
                return None
            for where, problem in _replay_stream(path, stream, candidate, report, identities):
                malformed += 1
                if malformed <= MAX_ERRORS:
                    (_warn if skip else fail)(f"{where}: {problem}")
                if not skip and malformed >= MAX_ERRORS:
                    break
            if malformed and not skip:
                break
    if malformed > MAX_ERRORS and skip:
        _warn(f"{malformed - MAX_ERRORS} more malformed lines skipped")
    if malformed and not skip:
        fail("the flow log is malformed (--skip-malformed replays the lines that are not)")
        return None
    return malformed


def _open(path: str, stack: ExitStack) -> IO[bytes] | None:
    if path == "-":
        return sys.stdin.buffer
    try:
        return stack.enter_context(open(path, "rb"))
    except OSError as exc:
        fail(f"--flows {path}: cannot read: {exc.strerror or exc}")
        return None


def _replay_stream(name: str, stream: IO[bytes], candidate: Candidate, report: ReplayReport,
                   identities: IdentityCache) -> Iterable[tuple[str, str]]:
    """Replay one stream; yields (file:line, problem) for each malformed line."""
    shown = "<stdin>" if name == "-" else name
    try:
        for number, line in split_lines(stream):
            if line is None:
                yield f"{shown}:{number}", f"line longer than {MAX_LINE} bytes"
                continue
            if not line.strip():
                continue
            try:
                parsed = parse_line(line, identities)
            except ReplayInputError as exc:
                yield f"{shown}:{number}", str(exc)
                continue
            if isinstance(parsed, Skipped):
                report.skipped[parsed.why] += 1
            else:
                report.add(parsed, candidate.decide(parsed))
    except OSError as exc:
        yield shown, f"read failed: {exc.strerror or exc}"


def _warn(message: str) -> None:
    print(f"enforcer: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------- output
def format_report(report: ReplayReport, candidate: str) -> list[str]:
    lines = [f"replayed {report.replayed} flow(s) against {candidate}: "
             f"{report.changed} would change, {report.not_decided} cannot be re-decided"]
    for title, groups in (("allowed -> denied", report.to_deny),
                          ("denied -> allowed", report.to_allow),
                          ("cannot be re-decided", report.undecidable)):
        total = sum(g.count for g in groups.values())
        lines.append(f"{title}: {total}")
        for group in sorted(groups.values(), key=lambda g: -g.count):
            lines.extend(_group_lines(group))
    lines.append(f"unchanged: {report.unchanged}"
                 + (f" ({report.other_rule} decided by another rule)" if report.other_rule
                    else ""))
    if report.skipped:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items()))
        lines.append(f"skipped (no decision recorded): {sum(report.skipped.values())} ({why})")
    if report.truncated:
        lines.append(f"note: {report.truncated} flow(s) had certificate SAN lists capped in "
                     "the record; rules on the names left out may decide otherwise")
    return lines


def _group_lines(group: Group) -> list[str]:
    was = ", ".join(f"{k} x{v}" for k, v in group.was.most_common())
    lines = [f"  {group.title}: {group.count} (recorded: {was})"]
    lines.extend(f"    {f.flow_id or '-'} {f.ts or '-'} {describe(f)}" for f in group.examples)
    if group.count > len(group.examples) and group.examples:
        lines.append(f"    ... {group.count - len(group.examples)} more")
    return lines


def describe(f: RecordedFlow) -> str:
    parts = [f"listener={f.listener}",
             f"port={f.local_port if f.local_port is not None else '-'}",
             f"source={f.client_ip if f.client_ip is not None else '-'}",
             f"tls={'yes' if f.tls else 'no'}"]
    if f.identity is not None:
        ident = f.identity.spiffe_id or f.identity.cn or f.identity.spki_sha256 or "?"
        parts.append(f"identity={ident}")
    if f.sni is not None:
        parts.append(f"sni={f.sni}")
    parts.extend(f"tlv.{k}={v}" for k, v in sorted(f.tlvs.items()))
    if f.server_identity is not None:
        parts.append(f"server_identity={f.server_identity.spiffe_id or f.server_identity.cn}")
    return " ".join(parts)


def report_json(report: ReplayReport, malformed: int) -> dict[str, Any]:
    def groups(gs: dict[str, Group]) -> list[dict[str, Any]]:
        return [{"decided_by": g.title, "count": g.count, "recorded": dict(g.was),
                 "examples": [{"flow_id": f.flow_id, "ts": f.ts, "flow": describe(f)}
                              for f in g.examples]}
                for g in sorted(gs.values(), key=lambda g: -g.count)]

    return {
        "replayed": report.replayed, "changed": report.changed,
        "allow_to_deny": groups(report.to_deny), "deny_to_allow": groups(report.to_allow),
        "undecidable": [{"why": g["decided_by"], **{k: v for k, v in g.items()
                                                    if k != "decided_by"}}
                        for g in groups(report.undecidable)],
        "unchanged": report.unchanged, "decided_by_another_rule": report.other_rule,
        "skipped": dict(report.skipped), "malformed_skipped": malformed,
        "truncated_identities": report.truncated,
    }
