"""Session-ticket keys shared by the worker processes of one supervisor.

With ``workers: N`` every worker accepts on its own ``SO_REUSEPORT`` socket, so a client's
next connection usually reaches another worker than the one that gave it its ticket. Each
worker drawing its own ticket keys (OpenSSL's default) or keeping sessions in its own
cache would then turn about (N-1)/N of the resumptions into full handshakes. Instead the
supervisor draws one random secret at startup (kept in memory, handed to each worker
through an inherited pipe, never written anywhere), and every worker derives the same
keys from it with HKDF-SHA256, per listener, per loaded material (its fingerprint: a new
certificate, CA or CRL still forces full handshakes) and per rotation period (the hour,
on the wall clock, so workers started at different times rotate together). Tickets then
carry the whole session, encrypted (stateless tickets), and any worker resumes any of them.

``ticket_keys`` gives OpenSSL's 80-byte key block: a 16-byte key name, a 32-byte HMAC-SHA256
key and a 32-byte AES-256 key (``SSL_CTX_set_tlsext_ticket_keys``).
"""

from __future__ import annotations

import os
import struct
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES: Final = 32
TICKET_KEY_BYTES: Final = 80  # name (16) + HMAC key (32) + AES key (32), OpenSSL's layout
ROTATION_PERIOD: Final = 3600  # seconds; keys change at every multiple of it (UTC)


def new_secret() -> bytes:
    return os.urandom(SECRET_BYTES)


def rotation_epoch(now: float, period: float = ROTATION_PERIOD) -> int:
    """The rotation period ``now`` (seconds since the epoch) falls in."""
    return int(now // period)


def ticket_keys(secret: bytes, listener: str, fingerprint: str, epoch: int) -> bytes:
    """The ticket key block of ``listener`` for a material ``fingerprint`` and ``epoch``."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a ticket secret is {SECRET_BYTES} bytes, got {len(secret)}")
    fields = (listener.encode(), fingerprint.encode(), struct.pack(">q", epoch))
    info = b"enforcer session tickets" + b"".join(
        struct.pack(">H", len(f)) + f for f in fields)  # length-prefixed: unambiguous
    return HKDF(algorithm=hashes.SHA256(), length=TICKET_KEY_BYTES, salt=None,
                info=info).derive(secret)
