"""Bounded fuzzing of the parsers that take bytes or text from outside.

Targets, and the one exception each may raise (anything else is a crash):
- PROXY protocol v1/v2 (``HeaderParser``, fed in random pieces, then the TLV decoding the
  data plane and the flow record do): ``ProxyProtocolError``;
- the config file (``load_config``: YAML text, then validation): ``ConfigError``;
- a rules file (``load_rulesets_file``, then compiling the rulesets): ``ConfigError``;
- the ClientHello of passthrough listeners (``HelloParser``, fed in random pieces, then
  the SNI router): ``HelloError``; the bytes it keeps must be exactly the bytes fed.
- the egress handshakes: SOCKS5 (``Socks5Parser``, logins answered yes or no):
  ``Socks5Error``; HTTP CONNECT (``ConnectParser``, then the Basic credentials):
  ``HttpError``; an egress credentials file (``parse_credentials``): ``CredentialsError``.
- flow-log replay input (``enforcer policy replay``: ``split_lines``, ``parse_line``, then
  deciding with a rulesets-only and a full-config candidate and tallying the report):
  ``ReplayInputError``.

Inputs are hypothesis-generated: mutations (flips, inserts, deletes, splices, cuts) of the
committed seed corpus in ``corpus/`` (``make_corpus.py`` regenerates the PROXY seeds),
structural mutations of the seed configs (a value anywhere replaced by any YAML value),
and plain random bytes. Each target runs in rounds of ``ROUND`` examples with a fresh
seed per round until its time budget is spent: ``FUZZ_SECONDS`` (default 15) per target.
A hang is an input that takes more than ``HANG_SECONDS`` (SIGALRM) and fails the run,
as does a crash; hypothesis then prints the smallest input it found, which belongs in
the corpus once fixed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from enforcer.config.errors import ConfigError
from enforcer.config.loader import load_config, load_rulesets_file
from enforcer.config.model import SniRouteConfig
from enforcer.config.passthrough import SniRouter
from enforcer.dataplane.clienthello import HelloError, HelloParser
from enforcer.egress.credentials import CredentialsError, parse_credentials
from enforcer.egress.httpconnect import ConnectParser, HttpError, basic_credentials
from enforcer.egress.socks5 import Done, Login, Send, Socks5Error, Socks5Parser
from enforcer.policy import compile_rulesets
from enforcer.policy.replay import (
    Candidate,
    IdentityCache,
    RecordedFlow,
    ReplayInputError,
    ReplayReport,
    parse_line,
    split_lines,
)
from enforcer.proxyproto import HeaderParser, ProxyProtocolError

pytestmark = [pytest.mark.faults]

CORPUS = Path(__file__).parent / "corpus"
BUDGET = float(os.environ.get("FUZZ_SECONDS", "15"))
ROUND = 50
HANG_SECONDS = 5.0
BASE_SEED = 2323


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"an input took more than {HANG_SECONDS} s")


def _seeds(kind: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted((CORPUS / kind).iterdir()) if p.is_file()]


def _mutate(data: bytes, edits: list[tuple[int, int, bytes]], splice: bytes) -> bytes:
    buf = bytearray(data)
    for op, pos, chunk in edits:
        at = pos % (len(buf) + 1)
        if op == 0 and buf:  # flip bits
            i = at % len(buf)
            buf[i] ^= chunk[0] or 1
        elif op == 1:  # insert
            buf[at:at] = chunk
        elif op == 2:  # delete
            del buf[at:at + len(chunk)]
        elif op == 3:  # overwrite
            buf[at:at + len(chunk)] = chunk
        elif op == 4:  # cut
            del buf[at:]
        elif op == 5:  # splice another seed in
            buf[at:] = splice[pos % (len(splice) + 1):]
    return bytes(buf)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    edit = st.tuples(st.integers(0, 5), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8))
    return st.builds(_mutate, st.sampled_from(seeds), st.lists(edit, max_size=8),
                     st.sampled_from(seeds))


def fuzz(strategy: st.SearchStrategy[Any], body: Callable[[Any], None]) -> int:
    """Run ``body`` on examples of ``strategy`` for BUDGET seconds; returns how many."""
    @settings(max_examples=ROUND, deadline=timedelta(seconds=HANG_SECONDS), database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def prop(value: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS * 2)
        try:
            body(value)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    old = signal.signal(signal.SIGALRM, _alarm)
    rounds = 0
    try:
        deadline = time.monotonic() + BUDGET
        while time.monotonic() < deadline:
            seed(BASE_SEED + rounds)(prop)()
            rounds += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    return rounds * ROUND


# -- PROXY protocol ------------------------------------------------------------------------
def _proxy_body(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    parser = HeaderParser()
    header = None
    try:
        at = 0
        for n in [*cuts, len(data)]:
            if at >= len(data) or header is not None:
                break
            header = parser.feed(data[at:at + n])
            at += n
        if header is None:
            parser.eof()
            return
    except ProxyProtocolError:
        return
    # what the data plane and the flow record read from a parsed header
    header.tlvs_for_record()
    header.tlvs_for_policy()
    _ = (header.version, header.command, parser.rest, parser.header_length)


def test_fuzz_proxy_protocol(faults_summary: Any) -> None:
    data = st.one_of(mutated(_seeds("proxy")), st.binary(max_size=600))
    cuts = st.lists(st.integers(1, 64), max_size=12)
    n = fuzz(st.tuples(data, cuts), _proxy_body)
    faults_summary(f"{n} PROXY inputs, no crash or hang ({BUDGET:.0f} s)")


# -- ClientHello (tls.mode: passthrough) ----------------------------------------------------
_ROUTER = SniRouter((SniRouteConfig(("api.example.test",), "a"),
                     SniRouteConfig(("*.example.test",), "b")),
                    {"a": "a", "b": "b"}, None)  # type: ignore[dict-item]


def _hello_body(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    parser = HelloParser()
    fed = bytearray()
    hello = None
    try:
        at = 0
        for n in [*cuts, len(data)]:
            if at >= len(data) or hello is not None:
                break
            fed += data[at:at + n]
            hello = parser.feed(data[at:at + n])
            at += n
    except HelloError as exc:
        assert exc.reason and str(exc)
        return
    assert bytes(parser.raw) == bytes(fed), "the peeked bytes are relayed unchanged"
    if hello is not None:
        _ROUTER.route(hello.sni)


def test_fuzz_client_hello(faults_summary: Any) -> None:
    data = st.one_of(mutated(_seeds("clienthello")), st.binary(max_size=600))
    cuts = st.lists(st.integers(1, 300), max_size=12)
    n = fuzz(st.tuples(data, cuts), _hello_body)
    faults_summary(f"{n} ClientHello inputs, no crash or hang ({BUDGET:.0f} s)")


# -- config and rules files ------------------------------------------------------------------
_yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 40), st.floats(),
              st.text(max_size=30), st.sampled_from(["", "0", "1s", "off", "file:", "unix:",
                                                     "127.0.0.1:0", "[::1]:80", "*", "**"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _replace(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def structural(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    docs = [yaml.safe_load(s) for s in seeds]

    @st.composite
    def build(draw: Any) -> bytes:
        doc = draw(st.sampled_from(docs))
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(list(_paths(doc))))
            doc = _replace(doc, path, draw(_yaml_values))
        return yaml.safe_dump(doc, allow_unicode=True).encode()

    return build()


def _text_inputs(kind: str) -> st.SearchStrategy[bytes]:
    seeds = _seeds(kind)
    return st.one_of(mutated(seeds), structural(seeds), st.binary(max_size=300))


def _file_body(path: Path, load: Callable[[str], Any]) -> Callable[[bytes], None]:
    def body(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(ConfigError):
            load(str(path))
    return body


def test_fuzz_config_file(faults_summary: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # the seeds' rulesets_file, next to the fuzzed file as in config/
        for rules in (CORPUS / "rules").iterdir():
            (Path(tmp) / rules.name).write_bytes(rules.read_bytes())
        n = fuzz(_text_inputs("config"), _file_body(Path(tmp) / "enforcer.yaml", load_config))
    faults_summary(f"{n} config files, no crash or hang ({BUDGET:.0f} s)")


def _load_and_compile(path: str) -> None:
    compile_rulesets(load_rulesets_file(path))


def test_fuzz_rules_file(faults_summary: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        n = fuzz(_text_inputs("rules"), _file_body(Path(tmp) / "rules.yaml",
                                                   _load_and_compile))
    faults_summary(f"{n} rules files, no crash or hang ({BUDGET:.0f} s)")


# -- egress handshakes ----------------------------------------------------------------------
def _pieces(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    at = 0
    for n in [*cuts, len(data)]:
        if at >= len(data):
            return
        yield data[at:at + n]
        at += n


def _socks_body(case: tuple[bytes, list[int], bool, bool]) -> None:
    data, cuts, login, accept = case
    parser = Socks5Parser(login=login)
    try:
        for piece in _pieces(data, cuts):
            parser.feed(piece)
            while (event := parser.step()) is not None:
                if isinstance(event, Login):
                    assert len(event.user) < 256 and len(event.password) < 256
                    parser.login_result(accept)
                elif isinstance(event, Done):
                    assert 0 < event.request.port < 65536 and event.request.host
                    return
                else:
                    assert isinstance(event, Send)
            assert len(parser.buf) <= 4096
    except Socks5Error as exc:
        assert exc.reason and (exc.reply is None or len(exc.reply) <= 22)


def test_fuzz_socks5(faults_summary: Any) -> None:
    data = st.one_of(mutated(_seeds("socks5")), st.binary(max_size=600))
    cuts = st.lists(st.integers(1, 64), max_size=12)
    n = fuzz(st.tuples(data, cuts, st.booleans(), st.booleans()), _socks_body)
    faults_summary(f"{n} SOCKS5 handshakes, no crash or hang ({BUDGET:.0f} s)")


def _connect_body(case: tuple[bytes, list[int]]) -> None:
    data, cuts = case
    parser = ConnectParser(1024)
    try:
        for piece in _pieces(data, cuts):
            request = parser.feed(piece)
            if request is not None:
                assert 0 < request.port < 65536 and request.host
                if request.authorization is not None:
                    basic_credentials(request.authorization)
                return
            assert len(parser.buf) <= 1024 + 64
    except HttpError as exc:
        assert exc.status in (400, 405, 431)


def test_fuzz_http_connect(faults_summary: Any) -> None:
    data = st.one_of(mutated(_seeds("connect")), st.binary(max_size=1200))
    cuts = st.lists(st.integers(1, 64), max_size=12)
    n = fuzz(st.tuples(data, cuts), _connect_body)
    faults_summary(f"{n} CONNECT requests, no crash or hang ({BUDGET:.0f} s)")


def _credentials_body(data: bytes) -> None:
    with contextlib.suppress(CredentialsError, UnicodeDecodeError):
        parse_credentials(data.decode("utf-8"))


def test_fuzz_egress_credentials(faults_summary: Any) -> None:
    data = st.one_of(mutated(_seeds("credentials")), st.binary(max_size=300))
    n = fuzz(data, _credentials_body)
    faults_summary(f"{n} credentials files, no crash or hang ({BUDGET:.0f} s)")


# -- flow-log replay input ---------------------------------------------------------------------
def structural_lines(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed flow log with a value anywhere in one of its records replaced."""
    logs = [[json.loads(line) for line in s.splitlines()] for s in seeds]

    @st.composite
    def build(draw: Any) -> bytes:
        records = draw(st.sampled_from(logs))
        at = draw(st.integers(0, len(records) - 1))
        path = draw(st.sampled_from(list(_paths(records[at]))))
        records = [*records[:at], _replace(records[at], path, draw(_yaml_values)),
                   *records[at + 1:]]
        return b"".join(json.dumps(r).encode() + b"\n" for r in records)

    return build()


def _replay_body(candidates: list[Candidate]) -> Callable[[bytes], None]:
    def body(data: bytes) -> None:
        identities = IdentityCache(limit=8)
        reports = [ReplayReport() for _ in candidates]
        for _, line in split_lines(io.BytesIO(data), limit=4096):
            if line is None:
                continue  # overlong: the CLI reports it
            try:
                flow = parse_line(line, identities)
            except ReplayInputError as exc:
                assert str(exc)  # names what was wrong
                continue
            if isinstance(flow, RecordedFlow):
                for candidate, report in zip(candidates, reports, strict=True):
                    report.add(flow, candidate.decide(flow))
    return body


def test_fuzz_flow_log_replay_input(faults_summary: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for rules in (CORPUS / "rules").iterdir():
            (Path(tmp) / rules.name).write_bytes(rules.read_bytes())
        (Path(tmp) / "enforcer.yaml").write_bytes(
            (CORPUS / "config" / "sidecar-inbound.yaml").read_bytes())
        cfg = load_config(str(Path(tmp) / "enforcer.yaml"))
        candidates = [
            Candidate(load_rulesets_file(str(CORPUS / "rules" / "sidecar-inbound.rules.yaml"))),
            Candidate(cfg.rulesets, {lst.name: lst for lst in cfg.listeners}, cfg.upstreams)]
    seeds = _seeds("flows")
    inputs = st.one_of(mutated(seeds), structural_lines(seeds), st.binary(max_size=300))
    n = fuzz(inputs, _replay_body(candidates))
    faults_summary(f"{n} flow-log replay inputs, no crash or hang ({BUDGET:.0f} s)")
