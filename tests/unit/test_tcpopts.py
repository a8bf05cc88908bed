"""Dead-peer detection options: config keys, the setsockopt list, and real sockets."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from enforcer.config.errors import ConfigError
from enforcer.config.loader import parse_config
from enforcer.config.model import LimitsConfig
from enforcer.dataplane import tcpopts


def _cfg(limits: dict[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "version": 1, "node": {"name": "n"},
        "listeners": [{"name": "l", "listen": "0.0.0.0:0", "tls": {"mode": "off"},
                       "ruleset": "r", "upstream": "u"}],
        "upstreams": {"u": {"address": "10.0.0.1:80"}},
        "rulesets": {"r": {"default": "allow"}},
    }
    if limits is not None:
        raw["limits"] = limits
    return raw


def test_defaults() -> None:
    limits = parse_config(_cfg()).limits
    assert (limits.tcp_keepalive_idle, limits.tcp_keepalive_interval,
            limits.tcp_keepalive_count, limits.tcp_user_timeout) == (30.0, 10.0, 3, 30.0)
    assert tcpopts.detection_bound(limits) == 40.0


def test_keys_parse_and_zero_turns_off() -> None:
    limits = parse_config(_cfg({"tcp_keepalive_idle": 0, "tcp_user_timeout": 0})).limits
    assert tcpopts.socket_options(limits) == ()
    assert tcpopts.detection_bound(limits) == 0.0
    limits = parse_config(_cfg({"tcp_keepalive_idle": "1m", "tcp_keepalive_interval": "5s",
                                "tcp_keepalive_count": 4, "tcp_user_timeout": 0})).limits
    assert tcpopts.detection_bound(limits) == 80.0  # idle + count x interval


@pytest.mark.parametrize(("key", "value", "message"), [
    ("tcp_keepalive_idle", "1500ms", "whole seconds"),
    ("tcp_keepalive_idle", "10h", "whole seconds"),
    ("tcp_keepalive_interval", 0, "whole seconds"),
    ("tcp_keepalive_count", 0, "limits.tcp_keepalive_count"),
    ("tcp_keepalive_count", 500, "limits.tcp_keepalive_count"),
    ("tcp_user_timeout", "30", "duration"),
])
def test_bad_values_are_named(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(_cfg({key: value}))
    text = str(exc.value)
    assert f"limits.{key}" in text and message in text


def test_options_reach_a_socket() -> None:
    limits = LimitsConfig(tcp_keepalive_idle=7, tcp_keepalive_interval=3,
                          tcp_keepalive_count=2, tcp_user_timeout=4.5)
    with socket.socket() as sock:
        tcpopts.apply(sock, tcpopts.socket_options(limits))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 2
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 4500


@pytest.mark.parametrize(("host", "local"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("localhost", True),
    ("10.0.0.1", False), ("0.0.0.0", False), ("backend.svc", False), ("fe80::1%eth0", False),
])
def test_local_hosts_get_no_options(host: str, local: bool) -> None:
    assert tcpopts.is_local_host(host) is local
