"""Server Name Indication per listener: record it, enforce it (strict_sni), and check that
the listener's certificate covers every name it serves.

How it works. OpenSSL calls a context's ``sni_callback`` while it parses the ClientHello,
before any certificate is sent, with the name the client asked for (``None`` when the
ClientHello has no SNI extension). ``sni_callback(names, strict)`` makes one callback per
listener that

- stores the name on the ``SSLObject`` as ``obj.enforcer_sni``; the data plane reads that
  attribute after the handshake (flow records, rules, the PROXY v2 authority TLV);
- with ``strict``, refuses a ClientHello without SNI, or with a name that matches none of
  ``server_names``, by returning ``ALERT_DESCRIPTION_UNRECOGNIZED_NAME``: OpenSSL then
  aborts the handshake with a fatal ``unrecognized_name`` alert, before the certificate
  is sent. The reason is left on the object as ``obj.enforcer_sni_refused`` for the
  flow record (the handshake itself fails with OpenSSL's generic CALLBACK_FAILED).

A pattern matches a name exactly or, for ``*.example.com``, any name with exactly one more
label in front (``a.example.com``, not ``example.com`` nor ``a.b.example.com``), as RFC 6125
does; names are compared without case and without a trailing dot.

``check_names_covered`` is the startup/reload check: every configured server name must be
covered by one of the certificate's DNS SANs, else a ``MaterialError`` naming the host and
the certificate's names. A wildcard server name is covered only by the same wildcard SAN.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from enforcer.tlsconf.material import LoadedMaterial, MaterialError

SniCallback = Callable[[Any, "str | None", ssl.SSLContext], "int | None"]


def _norm(name: str) -> str:
    return name.strip().lower().rstrip(".")


def name_matches(pattern: str, name: str) -> bool:
    """``pattern`` (exact or ``*.`` one label deep) matches the host ``name``."""
    pattern, name = _norm(pattern), _norm(name)
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and head != "*" and rest == pattern[2:]
    return pattern == name


def covered_by(server_name: str, san_dns: Iterable[str]) -> bool:
    """A configured server name is covered by a certificate's DNS SANs."""
    wanted = _norm(server_name)
    sans = [_norm(s) for s in san_dns]
    if wanted.startswith("*."):
        return wanted in sans
    return any(name_matches(san, wanted) for san in sans)


def sni_callback(server_names: Sequence[str], *, strict: bool) -> SniCallback:
    """The per-listener callback: remember the SNI; with ``strict``, refuse unknown names."""
    patterns = tuple(_norm(n) for n in server_names)

    def remember(obj: Any, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
        obj.enforcer_sni = server_name
        if not strict:
            return None
        if server_name is None:
            obj.enforcer_sni_refused = "the ClientHello has no SNI (strict_sni)"
        elif not any(name_matches(p, server_name) for p in patterns):
            obj.enforcer_sni_refused = f"SNI {server_name!r} is not in server_names (strict_sni)"
        else:
            return None
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    return remember


def check_names_covered(where: str, server_names: Sequence[str], strict: bool,
                        material: LoadedMaterial) -> None:
    """Raise ``MaterialError`` unless ``material``'s certificate covers every server name.

    ``where`` is the listener's key path (``listeners.gateway.tls``).
    """
    if strict and not server_names:
        raise MaterialError(f"{where}.strict_sni: needs server_names (the names to accept)")
    dns = material.dns_names
    missing = [n for n in server_names if not covered_by(n, dns)]
    if missing:
        names = ", ".join(dns) if dns else "no DNS names"
        raise MaterialError(
            f"{where}.server_names: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not covered by the certificate of "
            f"material '{material.name}' ({material.cert_file}; its DNS names: {names})")
