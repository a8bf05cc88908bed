"""One-line errors on stderr, and loading a config with every problem reported."""

from __future__ import annotations

import os
import sys

from enforcer.config.errors import ConfigError
from enforcer.config.loader import load_config
from enforcer.config.model import Config


def fail(message: str) -> None:
    for line in message.splitlines() or [message]:
        print(f"enforcer: error: {line}", file=sys.stderr)


def load_config_or_report(path: str, *, name_file: bool = False) -> Config | None:
    """The config at ``path``, or None after printing each problem on its own line.
    ``name_file``: every line starts with the file (``enforcer run``: a container's log
    line says which mounted file is wrong), and a missing file says what to mount where."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for issue in exc.issues:
            keyed = name_file and issue.path and not issue.path.startswith(path)
            fail(f"{path}: {issue}" if keyed else str(issue))
        if name_file and not os.path.exists(path):
            fail(f"nothing at {path}: mount the directory holding {os.path.basename(path)} "
                 f"at {os.path.dirname(path) or '.'} (in Kubernetes: the config ConfigMap as a "
                 f"volume there, not with subPath; see docs/kubernetes.md)")
        return None
