"""Every key the config loader accepts, found by running it, not by reading docs.

``traced_keys()`` parses one config that sets every section (each TLS source, inline
material, a rule with every ``from``/``to`` key, the TLVs ...) with ``Node.keys`` wrapped,
so each call records the key path it checked and the keys it allows. Paths are made
generic: ``listeners[0].tls`` -> ``listeners[].tls``, ``tls.mesh`` -> ``tls.<name>``.
The config need not be valid (the loader reports problems at the end, after every
``keys`` call); ``literal_key_sets()`` reads the loader's sources for every key list given
to ``keys(...)``, so a section the maximal config below does not reach fails the test
instead of going unnoticed.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from enforcer.config import loader, reader, rulesets
from enforcer.config.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "enforcer/config/loader.py", ROOT / "enforcer/config/rulesets.py",
           ROOT / "enforcer/config/passthrough.py"]

_RULE = {"name": "r", "description": "d", "action": "allow", "ports": [1],
         "from": {"identities": ["spiffe://td/a"], "trust_domains": ["td"], "dns": ["a.b"],
                  "cn": ["c"], "ou": ["o"], "spki_sha256": ["x"], "cidrs": ["10.0.0.0/8"],
                  "tlvs": {k: ["v"] for k in rulesets.TLV_KEYS}, "tls": "required"},
         "to": {"listeners": ["l"], "ports": [1], "sni": ["a.b"], "destinations": ["a:1"],
                "server_identities": ["a.b"], "hosts": ["*.a.b"]},
         "limits": {"per": "client", "max_connections": 1, "rate": "1/s", "burst": 1,
                    "ipv4_prefix": 24, "ipv6_prefix": 64}}
MAXIMAL: dict[str, Any] = {
    "version": 1, "node": {"name": "n", "labels": {"a": "b"}},
    "tls": {"m": {"cert": "c", "key": "k", "ca": "a", "crl": "r", "dir": "d",
                  "inline": {"cert": "x", "key": "x", "ca": "x"}, "pkcs12": "p",
                  "password_env": "E", "min_version": "1.2", "cipher_suites": ["x"],
                  "spiffe": {"socket": "unix:/s", "timeout": "1s"}}},
    "listeners": [{"name": "l", "listen": "127.0.0.1:1", "ruleset": "rs", "upstream": "u",
                   "protocol": "http_connect",
                   "egress": {"credentials": "users", "request_timeout": "1s",
                              "max_request_bytes": 1024},
                   "proxy_protocol": {"accept": "off", "trusted_sources": [], "timeout": "1s"},
                   "tls": {"mode": "off", "material": "m", "client_auth": "none",
                           "server_names": [], "strict_sni": False, "alpn": [],
                           "close_on_revocation": False, "close_on_expiry": False}},
                  {"name": "p", "listen": "127.0.0.1:4", "ruleset": "rs", "upstream": "u",
                   "tls": {"mode": "passthrough",
                           "routes": [{"server_names": ["a.b"], "upstream": "u"}]}}],
    "upstreams": {"u": {"address": "127.0.0.1:2", "proxy_protocol": {"send": "v2", "tlvs": []},
                        "tls": {"mode": "tls", "material": "m", "server_name": "s",
                                "verify": {"uri": [], "dns": [], "cn": []}}}},
    "rulesets": {"rs": {"default": "deny", "reevaluate_on_reload": False, "rules": [_RULE]}},
    "rulesets_file": None, "workers": 1, "relay": "auto",
    "flow_log": {"sink": "stdout", "max_bytes": 1, "backups": 1, "open_events": False,
                 "queue_size": 1},
    "admin": {"listen": "127.0.0.1:3"},
    "mesh": {"material": "m", "networks": [{"cidrs": ["10.0.0.0/8"], "ports": [1]}],
             "inbound": "strict",
             "external": {"default": "deny",
                          "plaintext": [{"cidrs": ["10.0.0.0/8"], "ports": [1]}]}},
    "limits": {k: "1s" for k in ("handshake_timeout", "connect_timeout", "idle_timeout",
                                 "close_timeout", "max_lifetime", "drain_timeout")}
    | {"max_connections": 1},
}


def generic(path: str) -> str:
    """``listeners[0].tls`` -> ``listeners[].tls``; names under the mapping sections
    (``tls``, ``upstreams``, ``rulesets``) -> ``<name>``."""
    path = re.sub(r"\[\d+\]", "[]", path)
    parts = path.split(".") if path else []
    for i, _part in enumerate(parts):
        if i > 0 and parts[i - 1] in ("tls", "upstreams", "rulesets") and (
                i == 1 or parts[i - 1] in ("upstreams", "rulesets")):
            parts[i] = "<name>"
    return ".".join(parts)


@contextmanager
def _recording(calls: list[tuple[str, tuple[str, ...]]]) -> Iterator[None]:
    original = reader.Node.keys

    def keys(self: reader.Node, allowed: Sequence[str]) -> bool:
        calls.append((self.path, tuple(allowed)))
        return original(self, allowed)

    reader.Node.keys = keys  # type: ignore[method-assign]
    try:
        yield
    finally:
        reader.Node.keys = original  # type: ignore[method-assign]


def traced() -> list[tuple[str, tuple[str, ...]]]:
    calls: list[tuple[str, tuple[str, ...]]] = []
    with _recording(calls), suppress(ConfigError):
        loader.parse_config(MAXIMAL)
    return calls


def traced_keys() -> set[str]:
    """Every accepted key as a generic dotted path (``listeners[].tls.mode``)."""
    out: set[str] = set()
    for path, allowed in traced():
        prefix = generic(path)
        for key in allowed:
            out.add(f"{prefix}.{key}" if prefix else key)
    return out


def literal_key_sets() -> set[tuple[str, ...]]:
    """The key tuples the loader's sources pass to ``.keys(...)`` (literals or constants)."""
    consts: dict[str, tuple[str, ...]] = {}
    calls: list[ast.expr] = []
    for source in SOURCES:
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.endswith("_KEYS"):
                        consts[target.id] = tuple(ast.literal_eval(node.value))
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "keys" and node.args):
                calls.append(node.args[0])
    out: set[tuple[str, ...]] = set()
    for arg in calls:
        if isinstance(arg, ast.Name):
            out.add(consts[arg.id])
        else:
            out.add(tuple(ast.literal_eval(arg)))
    return out
