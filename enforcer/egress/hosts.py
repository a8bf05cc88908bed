"""What an egress client may ask for as a destination host (pure).

A host is an IPv4 or IPv6 address, or a DNS name: at most 253 characters, labels of 1-63
letters, digits, ``-`` and ``_`` (no leading or trailing ``-``), no empty label; a trailing
dot is dropped and the name is lowercased, so rules see one spelling of each name.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

MAX_NAME: Final = 253
_LABEL: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class BadHost(ValueError):
    """The requested host is not an address nor a usable DNS name."""


def normalize_host(text: str) -> str:
    """The host as rules and the resolver see it; raises ``BadHost``."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise BadHost(f"bad IPv6 address {text!r}") from None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME:
        raise BadHost(f"host name of {len(name)} characters (1-{MAX_NAME})")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise BadHost(f"bad host name {_shown(text)}")
    if all(label.isdigit() for label in name.split(".")):
        raise BadHost(f"bad IPv4 address {_shown(text)}")
    return name


def _shown(text: str) -> str:
    return repr(text if len(text) <= 64 else text[:61] + "...")
