"""A person on the roster, and the text normalisation that makes Vietnamese names comparable."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace
from enum import StrEnum


class Role(StrEnum):
    STUDENT = "student"
    STAFF = "staff"


@dataclass(frozen=True, slots=True)
class Person:
    """Someone on a school's roster. Parents' phones and e-mails are the hub's, for notifications; a gate never
    keeps them (``without_contacts``)."""

    id: str
    full_name: str
    role: Role = Role.STUDENT
    class_name: str | None = None
    active: bool = True
    cards: tuple[str, ...] = ()
    parent_phones: tuple[str, ...] = field(default=())
    parent_emails: tuple[str, ...] = field(default=())

    @property
    def search_name(self) -> str:
        return fold(self.full_name)

    def without_contacts(self) -> Person:
        """The person as a gate keeps them: a stolen gate must not give away how to reach every child's parents."""
        return replace(self, parent_phones=(), parent_emails=())


_SPACES = re.compile(r"\s+")
_PHONE_JUNK = re.compile(r"[\s.\-()]")
_PHONE_RE = re.compile(r"^(?:\+84|0)(\d{9})$")
_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def normalise_name(text: str) -> str:
    """NFC (one code point per Vietnamese letter, whatever the keyboard produced) and single spaces."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def fold(text: str) -> str:
    """Lower case without diacritics, so "Nguyễn Văn Đức" is found by typing "nguyen van duc"."""
    decomposed = unicodedata.normalize("NFD", text.replace("đ", "d").replace("Đ", "D"))
    bare = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return _SPACES.sub(" ", bare.casefold()).strip()


def normalise_phone(text: str) -> str:
    """A Vietnamese mobile number as +84XXXXXXXXX; raises ValueError on anything else."""
    cleaned = _PHONE_JUNK.sub("", text)
    if cleaned.startswith("84") and len(cleaned) == 11:
        cleaned = "+" + cleaned
    match = _PHONE_RE.match(cleaned)
    if not match:
        raise ValueError(f"not a Vietnamese phone number: {text!r}")
    return "+84" + match.group(1)


def check_email(text: str) -> str:
    cleaned = text.strip()
    if not _EMAIL_RE.match(cleaned):
        raise ValueError(f"not an e-mail address: {text!r}")
    return cleaned.lower()
