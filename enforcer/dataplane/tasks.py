"""``spawn``: create a task and keep a strong reference until it finishes.

The event loop only keeps weak references to tasks, so a task nobody holds can be garbage
collected mid-flight. Every task in enforcer goes through here (raw ``create_task`` is
banned by ruff).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_live: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _live.add(task)
    task.add_done_callback(_live.discard)
    return task
