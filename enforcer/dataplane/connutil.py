"""Helpers of the connection I/O layer that need no connection: addresses, TLS failure
labels, socket probes (split from connection.py to keep it about the lifecycle)."""

from __future__ import annotations

import datetime
import functools
import ipaddress
import logging
import os
import socket
import ssl
import time
from typing import Any, Final, cast

from enforcer.tlsconf.identity import PeerIdentity

log = logging.getLogger("enforcer.dataplane")

# an upstream socket that cannot be opened is logged as a warning at most every
# WARN_EVERY seconds (it comes in floods)
WARN_EVERY: Final = 1.0
_warned = {"at": -WARN_EVERY, "since": 0}


def warn_out_of_descriptors(listener: str, upstream: str, exc: OSError) -> None:
    """A WARNING without traceback, at most one every WARN_EVERY seconds."""
    now = time.monotonic()
    _warned["since"] += 1
    if now - _warned["at"] < WARN_EVERY:
        return
    log.warning("listener %s: cannot open a socket to upstream %s (%s): %d connection(s) "
                "failed this way since the last warning (enforcer_upstream_errors_total)",
                listener, upstream, exc.strerror or exc, _warned["since"])
    _warned["at"], _warned["since"] = now, 0


def sockaddr_text(sockaddr: Any) -> str:
    host, port = str(sockaddr[0]), int(sockaddr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


MAPPED: Final = "::ffff:"  # an IPv4-mapped IPv6 address, as the kernel prints it


@functools.lru_cache(maxsize=4096)
def client_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The policy's client address (zone id dropped); parsed once per distinct address."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def header_flow_id(unique_id: bytes | None) -> str | None:
    """A PROXY unique_id TLV usable as a flow id (1-128 printable ASCII), else None."""
    if not unique_id or len(unique_id) > 128 or not all(0x21 <= b < 0x7F for b in unique_id):
        return None
    return unique_id.decode("ascii")


def has_unread(transport: Any) -> bool:
    """Whether the client's bytes (or FIN) wait in the socket unread: a busy loop can run
    the detect timer before the read callback of data that came in time."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # an error is pending: let the read path report it
    return True


def addr(value: object) -> tuple[str, int] | None:
    """A socket address as (host, port); an IPv4 peer of a dual-stack ``[::]`` listener
    (``::ffff:a.b.c.d``) as the IPv4 address it is, for rules, PROXY and records."""
    if isinstance(value, tuple) and len(value) >= 2:
        host = str(value[0])
        if host.startswith(MAPPED) and "." in host:
            host = host[len(MAPPED):]
        elif len(value) == 2 and host is value[0] and type(value[1]) is int:
            return cast(tuple[str, int], value)  # as it is: no copy kept per connection
        return host, int(value[1])
    if isinstance(value, str) and value:
        return value, 0
    return None


def tls_detail(exc: ssl.SSLError) -> str:
    """OpenSSL's reason, plus the verifier's message when a certificate was refused."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"  # e.g. Hostname mismatch, ...
    return str(exc.reason or exc)


def tls_reason(exc: ssl.SSLError) -> str:
    """A short, low-cardinality label for a handshake failure."""
    text = (exc.reason or "").lower().replace("_", " ")  # OpenSSL: PEER_DID_NOT_RETURN_...
    if "wrong version number" in text or "http request" in text:
        return "not_tls"
    if "certificate required" in text or "peer did not return a certificate" in text:
        return "no_client_cert"
    if "unknown ca" in text or "certificate verify failed" in text:
        return "bad_certificate"
    if "certificate" in text:
        return "bad_certificate"
    if "version" in text or "protocol" in text:
        return "protocol_version"
    if "cipher" in text:
        return "no_shared_cipher"
    if isinstance(exc, ssl.SSLEOFError) or "unexpected eof" in text:
        return "eof"
    return "other"


def expired(identity: PeerIdentity | None) -> bool:
    """OpenSSL does not look at the certificate again when a session resumes."""
    return identity is not None and identity.not_after <= datetime.datetime.now(datetime.UTC)
