"""One-line errors on stderr, and loading a config with every problem reported."""

from __future__ import annotations

import sys

from enforcer.config.errors import ConfigError
from enforcer.config.loader import load_config
from enforcer.config.model import Config


def fail(message: str) -> None:
    for line in message.splitlines() or [message]:
        print(f"enforcer: error: {line}", file=sys.stderr)


def load_config_or_report(path: str) -> Config | None:
    """The config at ``path``, or None after printing each problem on its own line."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            fail(str(issue))
        return None
