"""The optional C extension (``_pump.c``, the relay pump: see ``pump.py``): whether it can
run here.

The extension reaches the OpenSSL objects behind Python's ``ssl`` objects (their layout is
checked on live objects, and every OpenSSL function is looked up in the library the
``_ssl`` module itself uses). ``relay: auto`` (the default) uses it when it was built and
passed that check; ``relay: python`` runs no native code at all; ``relay: native`` refuses
to start without it.

Tried and dropped: resuming a TLS session without CPython's copy of it (``SSL_set_session``
on the shared ``SSL_SESSION``, ~150 us less per outbound connection). With TLS 1.3 and
OpenSSL 3.0 a shared session resumes once and then no more: OpenSSL changes it during the
resumed handshake, and the copy is what keeps enforcer's cached session reusable.
"""

from __future__ import annotations

import ssl
from typing import Any

Triple = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]


def _sample(ctx: ssl.SSLContext) -> Triple:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(incoming, outgoing, server_hostname="native.check"), incoming, outgoing


def _bind() -> tuple[Any, str | None]:
    """The bound extension module, or None and why not."""
    try:
        from enforcer.dataplane import _pump  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"the native extension is not built ({exc})"
    import _ssl

    try:
        _pump.bind(_ssl.__file__, _sample(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)))
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        return None, f"the native extension cannot use this Python's ssl module: {exc}"
    return _pump, None


MODULE, UNAVAILABLE = _bind()


def available() -> bool:
    return MODULE is not None
