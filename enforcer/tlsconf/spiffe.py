"""The SPIFFE Workload API as a source of TLS material: ``tls.<name>.spiffe: {socket: ...}``.

A SPIRE agent (or any Workload API server) streams the workload's X.509 SVID (certificate
chain and key) and the trust bundles (its own trust domain's and the federated ones) over
a unix socket, and streams them again whenever any of them changes. ``watch(socket)``
keeps one ``SvidWatch`` per socket for the process: the ``spiffe`` package's
``WorkloadApiClient.stream_x509_contexts`` runs the gRPC stream in its own thread (it
reconnects with backoff on retryable errors), and every update is turned into PEM bytes
(leaf first, then intermediates; the key as PKCS#8; every bundle's authorities) and counted
in the process-wide ``generation()``.

Rotation goes through the same path as files: ``material.load_material`` reads a watch's
latest ``SvidSnapshot`` where it would read files, with every check files get, and the
reloader (``runtime.reload``), which polls file signatures once a second, polls
``generation()`` too: a new SVID or bundle is swapped in within a second, new handshakes use
it, open connections keep theirs, and ``enforcer_certificate_expiry_timestamp_seconds``
follows the SVID in use.

Failure: at startup ``snapshot`` waits up to ``spiffe.timeout`` for the first SVID and
otherwise fails naming the key and what went wrong (fail closed). Later, if the agent goes
away, the last good material stays in use (an SVID keeps working until it expires: the
expiry metric and /status show how long); a stream that stops for good (a non-retryable
gRPC status) is started again every ``RESTART`` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

log = logging.getLogger("enforcer.tls")

RESTART = 2.0  # seconds before a stream that stopped for good is started again


class SpiffeError(RuntimeError):
    """No SVID (yet): the message says why."""


@dataclass(frozen=True, slots=True)
class SvidSnapshot:
    spiffe_id: str
    cert_pem: bytes  # leaf, then intermediates
    key_pem: bytes  # PKCS#8
    bundle_pem: bytes  # every trust bundle's authorities (own trust domain + federated)
    trust_domains: tuple[str, ...]


def _import_client() -> Any:
    with warnings.catch_warnings():  # the package imports cryptography's deprecated DSA
        warnings.simplefilter("ignore")
        from spiffe import WorkloadApiClient
    return WorkloadApiClient


def snapshot_of(context: Any) -> SvidSnapshot:
    """PEM bytes of an ``X509Context`` (the default SVID and every bundle)."""
    svid = context.default_svid
    cert_pem = b"".join(c.public_bytes(Encoding.PEM) for c in svid.cert_chain)
    key_pem = svid.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    bundles = sorted(context.x509_bundle_set.bundles, key=lambda b: str(b.trust_domain))
    bundle_pem = b"".join(
        c.public_bytes(Encoding.PEM)
        for b in bundles
        for c in sorted(b.x509_authorities, key=lambda c: c.fingerprint(hashes.SHA256()))
    )
    return SvidSnapshot(str(svid.spiffe_id), cert_pem, key_pem, bundle_pem,
                        tuple(str(b.trust_domain) for b in bundles))


class SvidWatch:
    """The latest X.509 context from one Workload API socket. Thread-safe."""

    def __init__(self, socket_path: str) -> None:
        self.socket = socket_path
        self._cond = threading.Condition()
        self._snapshot: SvidSnapshot | None = None
        self._error = "no answer from the Workload API yet"
        self._client: Any = None
        self._cancel: Any = None
        self._closed = False
        self._start()

    def _start(self) -> None:
        with self._cond:
            if self._closed:
                return
        try:
            client = _import_client()(socket_path=f"unix:{self.socket}")
            cancel = client.stream_x509_contexts(self._on_update, self._on_error)
        except Exception as exc:  # ArgumentError: the socket does not exist (yet) ...
            self._failed(str(exc))
            return
        with self._cond:
            self._client, self._cancel = client, cancel

    def _on_update(self, context: Any) -> None:
        try:
            snap = snapshot_of(context)
        except Exception as exc:  # a key type or chain the conversion cannot handle
            self._set_error(f"unusable X.509 SVID: {exc}")
            return
        with self._cond:
            changed = snap != self._snapshot
            self._snapshot = snap
            self._error = ""
            self._cond.notify_all()
        if changed:
            _bump()
            log.info("SPIFFE Workload API %s: X.509 SVID %s (trust domains %s)",
                     self.socket, snap.spiffe_id, ", ".join(snap.trust_domains))

    def _on_error(self, exc: Exception) -> None:
        self._stop_client()
        self._failed(str(exc) or type(exc).__name__)

    def _failed(self, why: str) -> None:
        with self._cond:
            repeated = why == self._error
            kept = ("the last good SVID stays in use" if self._snapshot is not None
                    else "no SVID yet")
        self._set_error(why)
        if not repeated:  # once per distinct problem, not every RESTART seconds
            log.warning("SPIFFE Workload API %s: %s; %s, retrying every %.0f s", self.socket,
                        why, kept, RESTART)
        with self._cond:
            if self._closed:
                return
        timer = threading.Timer(RESTART, self._start)
        timer.daemon = True
        timer.start()

    def _set_error(self, why: str) -> None:
        with self._cond:
            self._error = why
            self._cond.notify_all()

    def snapshot(self, timeout: float) -> SvidSnapshot:
        """The latest SVID, waiting up to ``timeout`` for the first; SpiffeError if none."""
        with self._cond:
            self._cond.wait_for(lambda: self._snapshot is not None, timeout)
            if self._snapshot is None:
                raise SpiffeError(f"no X.509 SVID from the Workload API at unix:{self.socket} "
                                  f"within {timeout:g}s ({self._error})")
            return self._snapshot

    def _stop_client(self) -> None:
        with self._cond:
            client, cancel = self._client, self._cancel
            self._client = self._cancel = None
        with contextlib.suppress(Exception):
            if cancel is not None:
                cancel.cancel()
        with contextlib.suppress(Exception):
            if client is not None:
                client.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
        self._stop_client()


_watches: dict[str, SvidWatch] = {}
_watches_lock = threading.Lock()
_generation = 0


def _bump() -> None:
    global _generation
    with _watches_lock:
        _generation += 1


def generation() -> int:
    """Changes whenever any watch received a different SVID or bundle set."""
    return _generation


def watch(socket_path: str) -> SvidWatch:
    """The process's watch of ``socket_path``, started on first use."""
    with _watches_lock:
        w = _watches.get(socket_path)
        if w is None:
            w = _watches[socket_path] = SvidWatch(socket_path)
        return w


def close_all() -> None:
    """Stop every watch (tests; a process that exits just lets the daemon threads go)."""
    with _watches_lock:
        watches = list(_watches.values())
        _watches.clear()
    for w in watches:
        w.close()
