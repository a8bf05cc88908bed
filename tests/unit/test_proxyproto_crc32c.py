"""CRC32C (Castagnoli) against published check values and a bit-by-bit reference."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enforcer.proxyproto.crc32c import POLYNOMIAL, crc32c


def bitwise_crc32c(data: bytes) -> int:
    """Textbook bit-at-a-time CRC32C, written independently of the table version."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        # The standard "check" value of CRC-32C (CRC catalogue: CRC-32/ISCSI).
        (b"123456789", 0xE3069283),
        # RFC 3720 appendix B.4 test vectors.
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_known_values(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected
    assert bitwise_crc32c(data) == expected


def test_polynomial_is_castagnoli_reflected() -> None:
    assert int(f"{0x1EDC6F41:032b}"[::-1], 2) == POLYNOMIAL


def test_accepts_bytearray_and_memoryview() -> None:
    assert crc32c(bytearray(b"123456789")) == 0xE3069283
    assert crc32c(memoryview(b"xx123456789")[2:]) == 0xE3069283


@given(st.binary(max_size=300))
def test_table_matches_bitwise_reference(data: bytes) -> None:
    assert crc32c(data) == bitwise_crc32c(data)


@given(st.binary(max_size=100), st.binary(max_size=100))
def test_continuation_equals_whole(a: bytes, b: bytes) -> None:
    assert crc32c(b, crc32c(a)) == crc32c(a + b)
