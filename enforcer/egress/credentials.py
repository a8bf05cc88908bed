"""Egress users: a credentials file of ``user:hash`` lines, and password checks.

The file (``egress.credentials``) holds one ``name:$scrypt$ln=L,r=R,p=P$SALT$HASH`` line per
user (SALT and HASH in base64 without padding; ``#`` starts a comment line). No password
is ever stored in clear: ``enforcer egress-user NAME`` reads a password on stdin and
prints such a line. scrypt is in Python's hashlib (OpenSSL), no extra
package needed.

Checking a password costs a scrypt run (about 50 ms at the default ln=15), far too long
for the event loop: ``Credentials.check`` answers at once from the cache of verified
logins, and otherwise ``start_check`` runs scrypt in the bounded scrypt pool, shared by
concurrent identical logins (logincheck.py explains the cache, the single flight and the
bound). A success is cached only if the user's hash is still the one checked against
when the result lands (a reload in between makes it a failure). An unknown user costs
the same scrypt run as a known one (a dummy hash), so timing does not tell which user
names exist.

``Credentials.current`` re-reads the file when its size, mtime or inode changed (looked at
at most once a second): a rewritten file is live without a restart; one that no longer
parses is refused with an error log and the previous users stay. A reload forgets the
cached logins of every user whose hash changed or who is gone.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Final

from enforcer.egress import logincheck
from enforcer.egress.logincheck import ScryptPool, SingleFlight, VerifiedCache

log = logging.getLogger("enforcer.egress")

DEFAULT_LN: Final = 15
MAX_LN: Final = 20
MAX_R: Final = 32
MAX_P: Final = 16
MAX_FILE: Final = 4 * 1024 * 1024
RECHECK_EVERY: Final = 1.0
_HASH: Final = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")
USER_NAME: Final = re.compile(r"[^\s:]{1,255}")


class CredentialsError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ScryptHash:
    ln: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def verify(self, password: bytes) -> bool:
        got = hashlib.scrypt(password, salt=self.salt, n=1 << self.ln, r=self.r, p=self.p,
                             dklen=len(self.digest), maxmem=_maxmem(self.ln, self.r))
        return hmac.compare_digest(got, self.digest)


def _maxmem(ln: int, r: int) -> int:
    return 129 * r * (1 << ln) + (1 << 20)


def _b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def parse_hash(text: str) -> ScryptHash:
    m = _HASH.fullmatch(text)
    if m is None:
        raise CredentialsError("not a $scrypt$ln=L,r=R,p=P$SALT$HASH hash")
    ln, r, p = int(m[1]), int(m[2]), int(m[3])
    if not 1 <= ln <= MAX_LN or not 1 <= r <= MAX_R or not 1 <= p <= MAX_P:
        raise CredentialsError(f"scrypt parameters out of range (ln 1-{MAX_LN}, r 1-{MAX_R}, "
                               f"p 1-{MAX_P})")
    try:
        salt, digest = _b64(m[4]), _b64(m[5])
    except (binascii.Error, ValueError):
        raise CredentialsError("bad base64 in the salt or hash") from None
    if len(salt) < 8 or not 16 <= len(digest) <= 64:
        raise CredentialsError("salt under 8 bytes or hash not 16-64 bytes")
    return ScryptHash(ln, r, p, salt, digest)


def parse_credentials(text: str, source: str = "credentials") -> dict[str, ScryptHash]:
    """``user:hash`` lines -> users; raises ``CredentialsError`` naming the line."""
    users: dict[str, ScryptHash] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        where = f"{source} line {number}"
        if not colon or not USER_NAME.fullmatch(user):
            raise CredentialsError(f"{where}: expected user:hash (a user name of 1-255 "
                                   "characters without spaces or ':')")
        if user in users:
            raise CredentialsError(f"{where}: user {user!r} is listed twice")
        try:
            users[user] = parse_hash(hashed)
        except CredentialsError as exc:
            raise CredentialsError(f"{where}: user {user!r}: {exc}") from None
    return users


def hash_password(password: bytes, *, ln: int = DEFAULT_LN, r: int = 8, p: int = 1) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password, salt=salt, n=1 << ln, r=r, p=p, dklen=32,
                            maxmem=_maxmem(ln, r))

    def enc(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii").rstrip("=")

    return f"$scrypt$ln={ln},r={r},p={p}${enc(salt)}${enc(digest)}"


def read_credentials(path: str) -> dict[str, ScryptHash]:
    """The file's users; raises ``CredentialsError`` (unreadable, too big, bad line)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE + 1)
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise CredentialsError(f"{path}: larger than {MAX_FILE} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"{path}: not UTF-8 text") from None
    return parse_credentials(text, path)


class Credentials:
    """The users of one listener (see the module comment)."""

    __slots__ = ("_checked", "_dummy", "_key", "_stamp", "cache", "flights", "path", "pool",
                 "users")

    def __init__(self, path: str, pool: ScryptPool | None = None) -> None:
        self.path = path
        self._stamp = self._file_stamp()
        self.users = read_credentials(path)
        self._key = secrets.token_bytes(32)
        self.cache = VerifiedCache()
        self.flights: SingleFlight[bytes, _Flight] = SingleFlight()
        self.pool = pool or logincheck.POOL  # the process's scrypt pool
        self._checked = time.monotonic()
        self._dummy = ScryptHash(DEFAULT_LN, 8, 1, b"\0" * 16, b"\0" * 32)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def current(self) -> Credentials:
        """Re-read the file if it changed (at most once per ``RECHECK_EVERY``)."""
        now = time.monotonic()
        if now - self._checked < RECHECK_EVERY:
            return self
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp or stamp is None:
            return self
        try:
            users = read_credentials(self.path)
        except CredentialsError as exc:
            log.error("egress credentials not reloaded (the previous users stay): %s", exc)
            self._stamp = stamp
            return self
        self.replace(users)
        self._stamp = stamp
        log.info("egress credentials reloaded from %s: %d user(s)", self.path, len(users))
        return self

    def replace(self, users: dict[str, ScryptHash]) -> None:
        """New users: the cached logins of a changed or removed user are forgotten."""
        changed = {name for name, hashed in self.users.items() if users.get(name) != hashed}
        self.users = users
        self.cache.forget(changed)

    def _tag(self, user: bytes, password: bytes) -> bytes:
        return hmac.new(self._key, len(user).to_bytes(2, "big") + user + password,
                        hashlib.sha256).digest()

    def check(self, user: bytes, password: bytes, now: float | None = None) -> bool:
        """True when this login passed scrypt within ``logincheck.TTL`` (cached)."""
        return self.cache.hit(self._tag(user, password),
                              time.monotonic() if now is None else now)

    def start_check(self, user: bytes, password: bytes,
                    loop: asyncio.AbstractEventLoop) -> asyncio.Future[bool] | None:
        """The scrypt check's outcome to come (joined if the same login is being checked
        already), or None when the pool has too many checks unfinished: refuse the login.
        Await it through ``asyncio.shield`` (other logins may wait for it too)."""
        tag = self._tag(user, password)
        name = _name(user)
        hashed = self.users.get(name)
        flight = self.flights.get(tag)
        if flight is not None and flight.hashed == hashed:
            return flight.outcome
        running = self.pool.submit((hashed or self._dummy).verify, password)
        if running is None:
            return None
        flight = _Flight(hashed, loop.create_future())
        self.flights.start(tag, flight)

        def landed(_: concurrent.futures.Future[bool]) -> None:  # in the pool's thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._finished, tag, name, flight, running)

        running.add_done_callback(landed)
        return flight.outcome

    def _finished(self, tag: bytes, name: str, flight: _Flight,
                  running: concurrent.futures.Future[bool]) -> None:
        self.flights.finish(tag, flight)
        ok = False
        if not running.cancelled():
            exc = running.exception()
            if exc is not None:
                log.error("egress login check failed: %s", exc)
            # the hash checked against must still be the user's (not reloaded meanwhile)
            ok = (exc is None and running.result() and flight.hashed is not None
                  and self.users.get(name) == flight.hashed)
        if ok:
            self.cache.add(tag, name, time.monotonic())
        if not flight.outcome.done():
            flight.outcome.set_result(ok)


@dataclass(frozen=True, slots=True, eq=False)
class _Flight:
    hashed: ScryptHash | None  # None: an unknown user (checked against a dummy hash)
    outcome: asyncio.Future[bool]


def _name(user: bytes) -> str:
    try:
        return user.decode("utf-8")
    except UnicodeDecodeError:
        return ""  # no user has this name: a dummy check, refused
