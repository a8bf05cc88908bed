"""Apply, remove and list the interception rules with iptables / ip6tables (the I/O side
of ``xtables``): the fallback when the ``nft`` tool is missing. Both families, one
``iptables-restore --noflush`` transaction each, jumps added or deleted only as needed."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from enforcer.intercept import xtables
from enforcer.intercept.nft import InterceptError
from enforcer.intercept.ruleset import InterceptSpec

TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Iptables:
    """``binaries``: family -> (iptables, iptables-restore) paths."""

    binaries: dict[int, tuple[str, str]]

    @classmethod
    def find(cls) -> Iptables | None:
        found: dict[int, tuple[str, str]] = {}
        for family, name in ((4, "iptables"), (6, "ip6tables")):
            tool, restore = shutil.which(name), shutil.which(f"{name}-restore")
            if tool and restore:
                found[family] = (tool, restore)
        return cls(found) if 4 in found else None

    def apply(self, spec: InterceptSpec) -> None:
        for family, (tool, restore) in self.binaries.items():
            self._run([restore, "--noflush"], xtables.restore_input(spec, family))
            wanted = xtables.jumps(spec)
            for builtin, own in zip(("OUTPUT", "PREROUTING"), xtables.chains(spec.table),
                                    strict=True):
                present = self._has_jump(tool, builtin, own)
                if (builtin, own) in wanted and not present:
                    self._run([tool, "-t", "nat", "-A", *xtables.jump_rule(builtin, own)])
                elif (builtin, own) not in wanted and present:
                    self._run([tool, "-t", "nat", "-D", *xtables.jump_rule(builtin, own)])

    def remove(self, table: str) -> None:
        for tool, _ in self.binaries.values():
            for builtin, own in zip(("OUTPUT", "PREROUTING"), xtables.chains(table),
                                    strict=True):
                while self._has_jump(tool, builtin, own):
                    self._run([tool, "-t", "nat", "-D", *xtables.jump_rule(builtin, own)])
                if self._ok([tool, "-t", "nat", "-S", own]):
                    self._run([tool, "-t", "nat", "-F", own])
                    self._run([tool, "-t", "nat", "-X", own])

    def list_rules(self, table: str) -> str | None:
        """Every family's chains as ``iptables -S`` prints them; None when absent."""
        parts: list[str] = []
        for _family, (tool, _) in sorted(self.binaries.items()):
            for own in xtables.chains(table):
                done = self._call([tool, "-t", "nat", "-S", own])
                if done.returncode == 0:
                    parts.append(f"# {tool} -t nat\n{done.stdout}")
        return "".join(parts) or None

    def where(self, table: str) -> str:
        return "nat chains " + " and ".join(xtables.chains(table))

    def _has_jump(self, tool: str, builtin: str, own: str) -> bool:
        return self._ok([tool, "-t", "nat", "-C", *xtables.jump_rule(builtin, own)])

    def _ok(self, argv: list[str]) -> bool:
        return self._call(argv).returncode == 0

    def _run(self, argv: list[str], stdin: str = "") -> None:
        done = self._call(argv, stdin)
        if done.returncode != 0:
            why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
            if "Permission denied" in why or "Operation not permitted" in why:
                raise InterceptError("no_net_admin", f"{argv[0]} was refused: the process "
                                     "lacks CAP_NET_ADMIN in this network namespace")
            raise InterceptError("nft_failed", f"{argv[0]} failed: {why}")

    def _call(self, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  timeout=TIMEOUT, check=False)
        except OSError as exc:
            raise InterceptError("no_nft", f"cannot run {argv[0]}: {exc.strerror or exc}"
                                 ) from None
        except subprocess.TimeoutExpired:
            raise InterceptError("nft_failed", f"{argv[0]} did not answer in "
                                 f"{TIMEOUT:.0f}s") from None
