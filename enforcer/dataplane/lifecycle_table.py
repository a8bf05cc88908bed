"""The connection lifecycle's transition table: what each event does in each stage.

Read a column for a stage, a row for an event; the cell names an outcome (its meaning is
in ``OUTCOMES`` and in docs/design.md, whose copy of this table a test checks). ``.`` is an
impossible event: ``Lifecycle.handle`` raises ``LifecycleError``; ``-`` is an event that is
expected and does nothing (a socket's last callbacks after enforcer closed it).

Below the table: the close reasons the outcomes use (timers, ``fail`` and ``cert_revoked``
reasons with their action and abort, socket errors, unclean ends of a TLS stream). A ``fail`` with a reason missing here
is a bug: ``LifecycleError``, and the connection closes as ``internal_error``.
"""

from __future__ import annotations

from typing import Final

STAGES: Final = ("ACCEPTED", "PROXY", "DETECT", "HANDSHAKE", "AUTHORIZE", "CONNECT",
                 "UPSTREAM_TLS", "RELAY", "HALF_CLOSED", "DRAINING", "CLOSED")

GRID: Final = """
event              ACCEPTED PROXY    DETECT   HANDSHAKE AUTHORIZE CONNECT  UPSTREAM_TLS RELAY    HALF_CLOSED DRAINING CLOSED
accept             begin    .        .        .        .        .        .        .        .        .        .
proxy_done         .        after    .        .        .        .        .        .        .        .        .
tls_detected       .        .        tls      .        .        .        .        .        .        .        .
plain_detected     .        .        plain    .        .        .        .        .        .        .        .
handshake_done     .        .        .        authz    .        .        .        .        .        .        .
hello_done         .        .        routed   .        .        .        .        .        .        .        .
request_done       .        .        .        .        ask      .        .        .        .        .        .
decision           .        .        .        .        decided  decided  decided  .        .        .        .
upstream_connected .        .        .        .        .        upready  .        .        .        .        .
upstream_tls_done  .        .        .        .        .        .        relay    .        .        .        .
relay_started      .        .        .        .        .        .        .        started  started  started  .
client_data        .        parse    detect   shake    request  hold     hold     fwd      fwd      fwd      -
upstream_data      .        .        .        .        .        early    upshake  fwd      fwd      fwd      -
client_eof         .        proxyeof closed   closed   closed   defer    defer    half     fin      eof      -
upstream_eof       .        .        .        .        .        updefer  uptls    half     fin      eof      -
client_unclean_eof .        .        .        .        unclean  unclean  unclean  unclean  unclean  unclean  -
upstream_unclean_eof .        .        .        .        .        .        .        unclean  unclean  unclean  -
done               .        .        .        .        .        .        .        .        done     done     .
client_error       .        lost     lost     lost     lost     lost     lost     lost     lost     lost     -
upstream_error     .        .        .        .        .        lost     lost     lost     lost     lost     -
fail               fail     fail     fail     fail     fail     fail     fail     .        .        .        .
proxy_timeout      .        timeout  .        .        .        .        .        .        .        .        .
proxy_silence      .        quiet    .        .        .        .        .        .        .        .        .
detect_timeout     .        .        silent   .        .        .        .        .        .        .        .
handshake_timeout  .        .        timeout  timeout  .        .        .        .        .        .        .
connect_timeout    .        .        .        .        .        timeout  .        .        .        .        .
upstream_tls_timeout .        .        .        .        .        .        timeout  .        .        .        .
request_timeout    .        .        .        .        timeout  .        .        .        .        .        .
idle_timeout       .        .        .        .        .        .        .        idle     idle     idle     .
close_timeout      .        .        .        .        .        .        .        .        timeout  timeout  .
max_lifetime       .        timeout  timeout  timeout  timeout  timeout  timeout  timeout  timeout  timeout  .
drain              drain    drain    drain    drain    drain    drain    drain    drain    drain    .        .
drain_deadline     deadline deadline deadline deadline deadline deadline deadline deadline deadline deadline .
revoke             .        .        .        .        .        revoke   revoke   revoke   revoke   revoke   .
cert_revoked       .        .        .        .        cert     cert     cert     cert     cert     cert     -
internal_error     internal internal internal internal internal internal internal internal internal internal -
"""

# What each outcome does (the I/O layer executes the commands; see lifecycle.py).
OUTCOMES: Final = {
    "begin": "arm max_lifetime; then PROXY (arm proxy_protocol.timeout; with accept: optional "
             "on tls.mode auto or off, tls.detect_timeout as proxy_silence) when a PROXY "
             "header is read, else as `after`",
    "after": "tls.mode off: AUTHORIZE; terminate: HANDSHAKE (arm handshake_timeout); auto: DETECT "
             "(arm tls.detect_timeout, or handshake_timeout when it is 0); passthrough: "
             "DETECT, the ClientHello is read (arm handshake_timeout)",
    "tls": "HANDSHAKE (re-arm handshake_timeout if a detect_timeout ran)",
    "plain": "AUTHORIZE (egress listeners: first read the client's request, arm "
             "egress.request_timeout)",
    "authz": "AUTHORIZE (ask the policy)",
    "decided": "deny: CLOSED `denied`; allow or undecided (AUTHORIZE): CONNECT (arm "
               "connect_timeout, connect); allow when asked after the upstream: RELAY",
    "upready": "upstream TLS: UPSTREAM_TLS (arm handshake_timeout); else `relay`",
    "relay": "if undecided (rules on the upstream's identity): ask the policy and wait; "
             "else RELAY: held bytes go both ways",
    "started": "a held client EOF, then a held upstream EOF, are replayed (`half`/`fin`); "
               "Python relay: arm idle_timeout; `open` record when flow_log.open_events; "
               "DRAINING if the drain began",
    "parse": "bytes go to the PROXY parser",
    "detect": "bytes go to TLS/plaintext detection (passthrough: to the ClientHello parser)",
    "routed": "passthrough: the ClientHello named the route: AUTHORIZE",
    "request": "egress listeners: bytes go to the SOCKS5/CONNECT request parser",
    "ask": "egress: the request is complete (destination known): ask the policy",
    "shake": "bytes go to the server TLS handshake",
    "upshake": "bytes go to the upstream TLS handshake",
    "hold": "bytes are held (reading pauses at 256 KiB) until the relay starts",
    "early": "plaintext upstream: held like `hold`; TLS upstream: CLOSED `upstream_tls_failed`",
    "fwd": "bytes are forwarded to the other side (last activity noted for idle_timeout); "
           "from a side that has finished (a TLS peer's bytes after its close_notify) "
           "they are dropped",
    "proxyeof": "the PROXY parser says why (a `fail` follows)",
    "closed": "CLOSED `client_closed`",
    "defer": "the EOF is held and replayed when the relay starts",
    "updefer": "after early upstream bytes: held like `defer`; else CLOSED `upstream_closed`",
    "uptls": "CLOSED `upstream_tls_failed`",
    "half": "HALF_CLOSED (that side finished): pass the EOF on (shut write), arm "
            "close_timeout",
    "fin": "from the side still open: pass it on; Python relay: CLOSED `client_fin` or "
           "`upstream_fin` (who finished first); native pump: wait for `done`",
    "eof": "the first EOF: as `half` but the stage stays DRAINING (`first_eof` says which "
           "side finished); the second: as `fin`",
    "unclean": "a TLS end's FIN without close_notify (the event says which kind): on a "
               "record boundary (`no_close_notify`) with that side's "
               "tls.allow_eof_without_close_notify: as `<side>_eof` in that stage; else, and always mid-record "
               "(`truncated`): CLOSED `<side>_eof_without_close_notify`/`<side>_truncated` "
               "(action allow), both sockets reset",
    "done": "the pump sent both ends' last bytes: CLOSED `client_fin`/`upstream_fin`",
    "lost": "CLOSED `<side>_reset`/`_closed`/`_tls_error`, or `peer_timeout`",
    "fail": "CLOSED with the reason the I/O layer found (a refusal or failure; its action "
            "and abort come from REASONS, below the table in lifecycle_table.py)",
    "timeout": "CLOSED `<timer>`; idle/close/max_lifetime end as `<timer>_rst` with "
               "limits.timeout_close: rst",
    "quiet": "bytes came (held or unread): arm proxy_protocol.timeout; else no header and "
             "no TLS: AUTHORIZE (plaintext; the server speaks first)",
    "silent": "bytes wait unread: re-arm (handshake_timeout); else the client is plaintext: "
              "AUTHORIZE",
    "idle": "idle for idle_timeout: CLOSED `idle_timeout`; else re-arm for the rest",
    "drain": "the drain began (stop signal, reload): RELAY/HALF_CLOSED: DRAINING (relays on "
             "until both sides finish or the deadline); before the relay: noted, the "
             "connection goes on and enters DRAINING when its relay starts",
    "deadline": "CLOSED `drain` (the drain deadline passed, or a second stop signal)",
    "revoke": "only once allowed: CLOSED `policy_reload` (action deny)",
    "cert": "the client certificate or a CA of its chain was revoked by a reloaded CRL or "
            "expired: CLOSED `revoked`/`peer_certificate_expired` (action deny)",
    "internal": "CLOSED `internal_error`",
    "-": "nothing (a socket's last callbacks after enforcer closed it)",
    ".": "impossible: LifecycleError",
}


# ---------------------------------------------------------------------- close reasons
# timer events: the slot they use and the close reason when they end the connection
TIMERS: Final = {
    "proxy_timeout": ("stage", "proxy_protocol_timeout"),
    "proxy_silence": ("stage", "proxy_protocol_timeout"),
    "detect_timeout": ("stage", "detect_timeout"),
    "handshake_timeout": ("stage", "handshake_timeout"),
    "connect_timeout": ("stage", "upstream_connect_timeout"),
    "upstream_tls_timeout": ("stage", "upstream_tls_timeout"),
    "request_timeout": ("stage", "egress_timeout"),
    "idle_timeout": ("idle", "idle_timeout"),
    "close_timeout": ("close", "close_timeout"),
    "max_lifetime": ("life", "max_lifetime"),
}
RESETTING: Final = frozenset({"idle_timeout", "close_timeout", "max_lifetime"})
# a graceful close (egress_timeout: the HTTP client gets its 408 first)
KEEP_SOCKETS: Final = frozenset({"upstream_connect_timeout", "egress_timeout"})

# close reasons the I/O layer reports with a ``fail`` event: (action, abort)
REASONS: Final = {
    "max_connections": ("error", True),
    "not_redirected": ("deny", True),
    "loop": ("deny", True),
    "mesh_external_denied": ("deny", True),
    "mesh_plaintext_refused": ("deny", True),
    "client_closed": ("error", False),
    "sslv2_hello": ("error", False),
    "unexpected_tls_record": ("error", False),
    "handshake_failed": ("error", False),
    "bad_peer_certificate": ("error", False),
    "upstream_connect_failed": ("error", False),
    "upstream_resolve_failed": ("error", False),
    "upstream_tls_failed": ("error", False),
    "upstream_identity_mismatch": ("error", False),
    # tls.mode passthrough (passthrough.py): the ClientHello routes the connection
    "sni_refused": ("deny", False),
    "not_tls": ("error", False),
    "client_hello_invalid": ("error", False),
    "client_hello_too_large": ("error", False),
    # rule limits (limitgate.py): refused before any upstream connect
    "rate_limited": ("deny", False),
    "concurrency_limited": ("deny", False),
    # egress listeners (egress/resolved.py): every address the requested name resolved to
    # is refused by the rules
    "denied_resolved_address": ("deny", False),
    # the client certificate (certwatch.py): at the handshake, or a ``cert_revoked`` event
    "revoked": ("deny", True),
    "peer_certificate_expired": ("deny", True),
}
# egress listeners (egress/session.py): a refused SOCKS5 or CONNECT request, after its reply
REASONS.update({f"egress_{why}": ("error", False) for why in (
    "auth_required", "bad_address", "bad_address_type", "bad_credentials", "bad_login",
    "bad_method", "bad_request", "bad_version", "command_not_supported", "login_busy",
    "no_acceptable_method", "no_methods", "too_long")})
CERT_CLOSES: Final = frozenset({"revoked", "peer_certificate_expired"})
PROXY_PREFIX: Final = "proxy_protocol_"  # proxy_protocol_<reason>: ("error", True)
# what a side's socket reports (*_error events): (close reason, action, abort); "{who}"
# is client or upstream, action None means allow in the relay, error before it
SOCKET_ERRORS: Final = {
    "reset": ("{who}_reset", None, False),
    "closed": ("{who}_closed", None, False),
    "peer_timeout": ("peer_timeout", None, False),
    "tls_error": ("{who}_tls_error", "error", False),
}
# what a TLS end's FIN without close_notify was (``*_unclean_eof`` events: both relays
# classify, the core decides): the close reason when it fails the connection (action
# allow, both sockets reset: the other side must not take a cut stream for a whole one)
# and the flow record's detail
UNCLEAN: Final = {
    "truncated": ("{who}_truncated",
                  "the {who}'s TLS stream ended in the middle of a record (truncated)"),
    "no_close_notify": ("{who}_eof_without_close_notify",
                        "the {who} closed without TLS close_notify"),
}


def parse(grid: str = GRID) -> dict[tuple[str, str], str]:
    """The grid as ``{(stage, event): outcome}``, impossible cells left out."""
    lines = [line.split() for line in grid.strip().splitlines()]
    header, rows = lines[0][1:], lines[1:]
    if tuple(header) != STAGES:
        raise ValueError(f"lifecycle table: columns {header} are not {STAGES}")
    table: dict[tuple[str, str], str] = {}
    for row in rows:
        event, cells = row[0], row[1:]
        if len(cells) != len(STAGES):
            raise ValueError(f"lifecycle table: row {event} has {len(cells)} cells")
        for stage, cell in zip(STAGES, cells, strict=True):
            if cell not in OUTCOMES:
                raise ValueError(f"lifecycle table: unknown outcome {cell!r} ({event})")
            if cell != ".":
                table[(stage, event)] = cell
    return table


def events(grid: str = GRID) -> tuple[str, ...]:
    return tuple(line.split()[0] for line in grid.strip().splitlines()[1:])


def markdown(grid: str = GRID) -> str:
    """The table as docs/design.md shows it (tests/docs checks that they agree)."""
    lines = [line.split() for line in grid.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join([f"`{row[0]}`", *(c if c != "." else "" for c in row[1:])])
            + " |" for row in rows]
    out.append("")
    out += [f"- {'(empty)' if name == '.' else f'`{name}`'}: {text}"
            for name, text in OUTCOMES.items()]
    return "\n".join(out) + "\n"
