"""Card UIDs: one card must be one string however a reader or a spreadsheet wrote it."""

from __future__ import annotations

import pytest

from appliance.readers.uid import UidError, normalise_uid


@pytest.mark.parametrize(
    ("text", "fmt", "expected"),
    [
        ("04:a1:b2:c3:d4:e5:f6", "hex", "04A1B2C3D4E5F6"),
        ("04 A1 B2 C3", "hex", "04A1B2C3"),
        ("C3B2A104", "hex_reversed", "04A1B2C3"),
        ("0077705924", "dec10", "04A1B2C4"),
        ("3300040964", "dec10_reversed", "04A1B2C4"),
        ("0077705924", "auto", "04A1B2C4"),
        ("04a1b2c3d4e5f6", "auto", "04A1B2C3D4E5F6"),
    ],
)
def test_formats_normalise_to_reader_order_hex(text: str, fmt: str, expected: str) -> None:
    assert normalise_uid(text, fmt) == expected


@pytest.mark.parametrize(
    ("text", "fmt"),
    [("04A1B2C", "hex"), ("ZZ11", "hex"), ("", "hex"), ("4294967296", "dec10"), ("12ab", "dec10"), ("AB", "hex")],
)
def test_malformed_uids_rejected(text: str, fmt: str) -> None:
    with pytest.raises(UidError):
        normalise_uid(text, fmt)
