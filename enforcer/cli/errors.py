"""One-line errors on stderr."""

import sys


def fail(message: str) -> None:
    for line in message.splitlines() or [message]:
        print(f"enforcer: error: {line}", file=sys.stderr)
