"""Apply, remove and list the interception table with the ``nft`` tool (the I/O side;
``iptables`` is the fallback when nft is missing).

Before touching anything, ``preflight`` says which of the two things needed is missing:
the ``nft`` binary (or iptables) on PATH, or the CAP_NET_ADMIN capability (read from the effective
set in /proc/self/status, so the answer does not depend on parsing nft's error text).
Every call feeds its script on stdin to ``nft -f -``, one transaction each.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Protocol

from enforcer.intercept import ruleset
from enforcer.intercept.ruleset import InterceptSpec

CAP_NET_ADMIN = 12
NFT_TIMEOUT = 30.0


class InterceptError(Exception):
    """Why the rules could not be applied, removed or listed. ``kind``: ``no_nft``,
    ``no_net_admin`` or ``nft_failed`` (the exit code follows from it)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Backend(Protocol):
    """What the CLI needs of a rule installer (nft here, iptables in ``iptables``)."""

    def apply(self, spec: InterceptSpec) -> None: ...

    def remove(self, table: str) -> None: ...

    def list_rules(self, table: str) -> str | None: ...

    def where(self, table: str) -> str: ...


@dataclass(frozen=True, slots=True)
class Nft:
    binary: str

    def apply(self, spec: InterceptSpec) -> None:
        self.run(ruleset.apply_script(spec))

    def remove(self, table: str) -> None:
        self.run(ruleset.remove_script(table))

    def list_rules(self, table: str) -> str | None:
        return self.list_table(table)

    def where(self, table: str) -> str:
        return f"table inet {table}"

    def run(self, script: str) -> None:
        self._call(["-f", "-"], script)

    def list_table(self, table: str) -> str | None:
        """The table as nft prints it, or None when it does not exist."""
        try:
            return self._call(["list", "table", "inet", table], "")
        except InterceptError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise

    def _call(self, args: list[str], stdin: str) -> str:
        try:
            done = subprocess.run([self.binary, *args], input=stdin, capture_output=True,
                                  text=True, timeout=NFT_TIMEOUT, check=False)
        except OSError as exc:
            raise InterceptError("no_nft", f"cannot run {self.binary}: {exc.strerror or exc}"
                                 ) from None
        except subprocess.TimeoutExpired:
            raise InterceptError("nft_failed", f"{self.binary} did not answer in "
                                 f"{NFT_TIMEOUT:.0f}s") from None
        if done.returncode != 0:
            why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
            if "Operation not permitted" in why:
                raise InterceptError("no_net_admin", "nft was refused: the process lacks "
                                     "CAP_NET_ADMIN in this network namespace")
            raise InterceptError("nft_failed", f"nft failed: {why}")
        return done.stdout


def has_net_admin(status_path: str = "/proc/self/status") -> bool:
    try:
        with open(status_path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def preflight(backend: str = "auto", *, status_path: str = "/proc/self/status") -> Backend:
    """The installer to use (``auto``: nft, else iptables); InterceptError naming what is
    missing: the tool first, then CAP_NET_ADMIN."""
    from enforcer.intercept.iptables import Iptables

    binary = shutil.which("nft") if backend in ("auto", "nft") else None
    chosen: Backend | None = Nft(binary) if binary is not None else None
    if chosen is None and backend in ("auto", "iptables"):
        chosen = Iptables.find()
    if chosen is None:
        raise InterceptError("no_nft", {
            "nft": "the nft tool is not installed or not on PATH (install nftables)",
            "iptables": "iptables and iptables-restore are not installed or not on PATH",
        }.get(backend, "neither the nft tool nor iptables is installed or on PATH "
                       "(install nftables)"))
    if not has_net_admin(status_path):
        raise InterceptError("no_net_admin", "CAP_NET_ADMIN is missing: run with NET_ADMIN "
                             "(an init container with securityContext.capabilities.add: "
                             "[NET_ADMIN], or as root)")
    return chosen
