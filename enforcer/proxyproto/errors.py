"""The one error type of the PROXY protocol package, and its reason codes.

Every malformed header raises :class:`ProxyProtocolError`. Its ``reason`` is a short
snake_case code meant to be used as the ``reason`` label of
``enforcer_proxy_protocol_errors_total`` and in flow records, so the set is small and fixed
(``REASONS``); the message is for humans and logs. ``TIMEOUT`` and ``UNTRUSTED_SOURCE`` are
never raised here: the data plane raises them, and they are listed so that every reason
lives in one place.
"""

from __future__ import annotations

TRUNCATED = "truncated"  # the connection ended before a complete header (HeaderParser.eof)
TOO_LONG = "too_long"  # v1 line without CRLF in 107 bytes, v2 length above the limit
BAD_SIGNATURE = "bad_signature"  # neither "PROXY " nor the 12-byte v2 signature
BAD_VERSION = "bad_version"  # v2 version nibble other than 2
BAD_COMMAND = "bad_command"  # v2 command other than LOCAL (0) or PROXY (1)
BAD_FAMILY = "bad_family"  # v1 protocol other than TCP4/TCP6/UNKNOWN, v2 family/transport byte
BAD_ADDRESS = "bad_address"  # address not valid for its family, v2 address block too short
BAD_PORT = "bad_port"  # v1 port not a decimal 0-65535 without leading zeros
BAD_SYNTAX = "bad_syntax"  # v1 spacing, field count, characters, line ending
BAD_CRC = "bad_crc"  # PP2_TYPE_CRC32C does not match the header
TLV_OVERRUN = "tlv_overrun"  # a TLV (or SSL sub-TLV) runs past the end of its container
BAD_TLV = "bad_tlv"  # a known TLV with an invalid value or a repeated single-valued TLV
TIMEOUT = "timeout"  # raised by the data plane: no complete header in time
UNTRUSTED_SOURCE = "untrusted_source"  # raised by the data plane: header from an untrusted peer

REASONS: frozenset[str] = frozenset(
    {
        TRUNCATED,
        TOO_LONG,
        BAD_SIGNATURE,
        BAD_VERSION,
        BAD_COMMAND,
        BAD_FAMILY,
        BAD_ADDRESS,
        BAD_PORT,
        BAD_SYNTAX,
        BAD_CRC,
        TLV_OVERRUN,
        BAD_TLV,
        TIMEOUT,
        UNTRUSTED_SOURCE,
    }
)


class ProxyProtocolError(ValueError):
    """A PROXY protocol header is malformed (or, from the data plane, late or untrusted).

    ``reason`` is one of :data:`REASONS`; ``str(exc)`` is a human-readable message.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown PROXY protocol error reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ProxyProtocolError], tuple[str, str]]:
        return (type(self), (self.reason, str(self)))
