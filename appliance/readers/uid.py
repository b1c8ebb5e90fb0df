"""Card UIDs in one canonical form: uppercase hex, bytes in the order a PC/SC reader returns them.

Keyboard-wedge readers and school exports write the same card in other ways (10-digit
decimal, reversed bytes); everything is converted here so that one card is one string.
"""

from __future__ import annotations

import re

_HEX_RE = re.compile(r"^[0-9A-F]+$")
_SEPARATORS = re.compile(r"[\s:\-]")
MAX_UID_BYTES = 32


class UidError(ValueError):
    """A UID that cannot be understood in the expected format."""


def _reverse_bytes(hex_uid: str) -> str:
    return "".join(reversed([hex_uid[i : i + 2] for i in range(0, len(hex_uid), 2)]))


def _from_hex(text: str) -> str:
    cleaned = _SEPARATORS.sub("", text).upper()
    if not cleaned or not _HEX_RE.match(cleaned):
        raise UidError(f"not a hex card UID: {text!r}")
    if len(cleaned) % 2:
        raise UidError(f"hex card UID has an odd number of digits: {text!r}")
    if not 4 <= len(cleaned) <= 2 * MAX_UID_BYTES:
        raise UidError(f"hex card UID must be 2..{MAX_UID_BYTES} bytes: {text!r}")
    return cleaned


def _from_dec10(text: str) -> str:
    cleaned = text.strip()
    if not cleaned.isdigit() or not 1 <= len(cleaned) <= 10:
        raise UidError(f"not a decimal card number of at most 10 digits: {text!r}")
    value = int(cleaned)
    if value > 0xFFFFFFFF:
        raise UidError(f"decimal card number too large for a 4-byte UID: {text!r}")
    return f"{value:08X}"


def normalise_uid(text: str, fmt: str = "hex") -> str:
    """Canonical UID from text written as ``hex``, ``hex_reversed``, ``dec10``, ``dec10_reversed`` or ``auto``.

    ``dec10`` reads the 4 UID bytes as a big-endian number; ``dec10_reversed`` as little-endian,
    which is what most keyboard-wedge readers print. ``auto`` takes exactly 10 digits as
    ``dec10`` and anything else as hex.
    """
    text = text.strip()
    if fmt == "auto":
        fmt = "dec10" if text.isdigit() and len(text) == 10 else "hex"
    if fmt == "hex":
        return _from_hex(text)
    if fmt == "hex_reversed":
        return _reverse_bytes(_from_hex(text))
    if fmt == "dec10":
        return _from_dec10(text)
    if fmt == "dec10_reversed":
        return _reverse_bytes(_from_dec10(text))
    raise UidError(f"unknown UID format {fmt!r}")


def uid_from_bytes(data: bytes | list[int]) -> str:
    return bytes(data).hex().upper()
