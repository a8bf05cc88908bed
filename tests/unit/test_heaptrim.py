"""Heap trimming: freed memory scattered between live chunks goes back to the system once
enough has piled up, only once per growth, and a running server does it by itself."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from enforcer.runtime import heaptrim
from enforcer.runtime.heaptrim import HeapTrimmer, resident_bytes

MiB = 1024 * 1024


def scattered_garbage(total: int) -> list[bytes]:
    """Allocate ``total`` bytes in 4 KB chunks (malloc's heap, not Python's small-object
    arenas), then free 15 of every 16: the freed runs lie between chunks still in use."""
    chunks = [bytes(4000) for _ in range(total // 4096)]
    keep = chunks[::16]
    del chunks
    gc.collect()
    return keep


@pytest.fixture
def trimmer() -> HeapTrimmer:
    t = HeapTrimmer(min_free=8 * MiB)
    if not t.available:
        pytest.skip(t.unavailable_reason or "")
    return t


def test_scattered_freed_memory_goes_back_once(trimmer: HeapTrimmer) -> None:
    trimmer.maybe_trim()  # whatever earlier tests left behind
    keep = scattered_garbage(96 * MiB)
    assert trimmer.free_heap_bytes() >= 64 * MiB
    before = resident_bytes()
    returned = trimmer.maybe_trim()
    assert returned >= 48 * MiB, f"only {returned / MiB:.1f} MiB given back"
    assert resident_bytes() <= before - 48 * MiB
    assert trimmer.trims >= 1 and trimmer.returned_bytes >= returned
    trims = trimmer.trims
    # malloc still counts the given-back chunks as free; RSS has not grown: no second trim
    assert trimmer.free_heap_bytes() >= 64 * MiB
    assert trimmer.maybe_trim() == 0 and trimmer.trims == trims
    assert len(keep) == 96 * MiB // 4096 // 16  # the live chunks stay usable
    assert all(len(b) == 4000 for b in keep)


def test_little_free_memory_is_not_worth_a_trim(trimmer: HeapTrimmer) -> None:
    trimmer.maybe_trim()
    big = HeapTrimmer(min_free=1 << 40)  # more free heap than this machine has
    keep = scattered_garbage(16 * MiB)
    assert big.maybe_trim() == 0 and big.trims == 0
    assert len(keep) > 0


async def test_a_running_server_trims_by_itself(pki: Any, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Any) -> None:
    from enforcer.config.loader import load_config
    from enforcer.runtime.server import Server
    from tests.e2e.harness import inbound_cfg
    from tests.e2e.proc import write_config

    monkeypatch.setattr(heaptrim, "TRIM_INTERVAL", 0.05)
    monkeypatch.setattr(heaptrim, "TRIM_MIN_FREE", 8 * MiB)
    cfg = load_config(write_config(tmp_path / "in.yaml", {**inbound_cfg(pki, 9),
                                                          "flow_log": {"sink": "off"}}))
    server = Server(cfg, admin=False)
    if not server.heap_trimmer.available:
        pytest.skip(server.heap_trimmer.unavailable_reason or "")
    await server.start()
    try:
        server.heap_trimmer.maybe_trim()
        trims = server.heap_trimmer.trims
        keep = scattered_garbage(48 * MiB)
        async with asyncio.timeout(10):
            while server.heap_trimmer.trims == trims:
                await asyncio.sleep(0.05)
        assert server.heap_trimmer.returned_bytes > 0 and keep
    finally:
        server.request_stop()
        assert await server.shutdown() == 0
