"""The soak (``make soak``) in short: its workload, checks and summary work, and a short
run of the pair loses nothing and leaks no descriptor. (The RSS limit is looser than the
soak's 10%: half a minute is mostly warm-up.)"""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.soak import soak

pytestmark = [pytest.mark.faults]


async def test_short_soak(faults_summary: Any) -> None:
    ok, lines = await soak(30.0, 0.3, 25.0)
    faults_summary(" | ".join(lines))
    assert ok, "\n".join(lines)
