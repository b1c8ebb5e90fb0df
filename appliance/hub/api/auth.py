"""Bearer tokens for the hub's API and what each may do: a file of token lines, re-read when it changes.

A line is ``TOKEN schools=thcs-a,thcs-b rights=read,write  # comment``: the token, the schools whose
data it may see (``*``: every school of this hub), and its rights (``read``; ``write`` to send leave
requests; ``approve`` for those to count as approved). The file is the only place tokens live: adding,
narrowing or revoking an integration is an edit of the file (no restart). A bare token without scopes
(the format before scopes existed) is refused, with a warning naming its line: any scope the hub
guessed for it would either widen what it could do or still let one school's integration read
another's. Tokens are compared in constant time and never logged; what the hub records of a caller
(e.g. as the source of a leave request) is a short fingerprint of its token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.config.base import NAME_PATTERN

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
RIGHTS = ("read", "write", "approve")
EVERY_SCHOOL = "*"
LINE_FORMAT = "TOKEN schools=SCHOOL[,SCHOOL...] rights=read[,write][,approve]"
HOW_TO_CONFIGURE = (
    "set api.token_file in hub.toml to a file readable by the hub only, one line per integration: "
    f'{LINE_FORMAT} (e.g. `echo "$(openssl rand -hex 32) schools=thcs-dong-da rights=read" '
    ">> /etc/edugate/api.tokens; chmod 600 /etc/edugate/api.tokens`)"
)
WARN_EVERY = 60.0  # seconds between two warnings about refused tokens (a scanner must not flood the log)
_SCHOOL = re.compile(NAME_PATTERN)


class NoTokens(Exception):
    """The API cannot accept anyone: no token file configured, unreadable, or without a usable token."""


class Refused(Exception):
    """A token the hub does not accept; the message is what the caller is told (never the token itself)."""


class OutOfScope(Exception):
    """A valid token asking for something its line does not grant; the message names what is missing."""


@dataclass(frozen=True)
class Grant:
    """What one line of the token file allows: its schools (``None``: every school) and rights."""

    schools: frozenset[str] | None
    rights: frozenset[str]
    line: int

    def describe_schools(self) -> str:
        return "every school" if self.schools is None else ", ".join(sorted(self.schools))


@dataclass(frozen=True)
class Caller:
    """Who made a request and what their token allows, as far as the hub may record it."""

    fingerprint: str
    grant: Grant

    @property
    def source(self) -> str:
        return f"api:{self.fingerprint}"

    @property
    def schools(self) -> frozenset[str] | None:
        """The schools this caller may see; ``None`` for every school of the hub."""
        return self.grant.schools

    def may(self, right: str) -> bool:
        return right in self.grant.rights

    def need(self, right: str) -> None:
        """Raise :class:`OutOfScope` unless the token has ``right``."""
        if not self.may(right):
            has = ",".join(r for r in RIGHTS if r in self.grant.rights) or "none"
            raise OutOfScope(
                f"this token lacks the '{right}' right (its rights: {has}); rights are set on the token's line "
                f"in the hub's api.token_file (line {self.grant.line})"
            )

    def school(self, school: str) -> str:
        """``school`` if the token may see its data; :class:`OutOfScope` otherwise (whether it exists or not)."""
        if self.grant.schools is not None and school not in self.grant.schools:
            raise OutOfScope(
                f"this token is not for school {school!r} (it is for: {self.grant.describe_schools()}); schools "
                f"are set on the token's line in the hub's api.token_file (line {self.grant.line})"
            )
        return school


def fingerprint(token: bytes) -> str:
    """Eight hex digits of the token's SHA-256: tells integrations apart in records without revealing the token."""
    return hashlib.sha256(token).hexdigest()[:8]


@dataclass
class ParsedTokens:
    """A token file read: the usable lines, the tokens of lines without scopes, and what is wrong (one line each)."""

    grants: list[tuple[bytes, Grant]] = field(default_factory=list)
    unscoped: list[tuple[bytes, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _parse_line(number: int, fields: list[str], served: list[str]) -> tuple[Grant | None, str | None, list[str]]:
    """The grant of one line's fields after the token, or why the line cannot be used; plus remarks (typos)."""
    values: dict[str, str] = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep or key not in ("schools", "rights"):  # not echoed: it may be a piece of a token split by a space
            return None, f"after the token comes schools=... and rights=..., nothing else; a line is {LINE_FORMAT}", []
        if key in values:
            return None, f"{key}= is given twice", []
        values[key] = value
    missing = [k for k in ("schools", "rights") if k not in values]
    if missing:
        return None, f"no {' and no '.join(k + '=' for k in missing)}; a line is {LINE_FORMAT}", []
    rights = [r for r in values["rights"].split(",") if r]
    unknown = [r for r in rights if r not in RIGHTS]
    if unknown or not rights:
        return None, f"rights= takes {', '.join(RIGHTS)}, not {values['rights']!r}", []
    names = [s for s in values["schools"].split(",") if s]
    if names == [EVERY_SCHOOL]:
        schools = None
    elif not names or any(not _SCHOOL.match(s) for s in names):
        return (
            None,
            f"schools= takes school ids separated by commas, or * for every school; not {values['schools']!r}",
            [],
        )
    else:
        schools = frozenset(names)
    remarks = []
    if schools is not None and served:
        strangers = sorted(schools - set(served))
        if strangers:
            remarks.append(f"school(s) {', '.join(strangers)} not in hub.schools ({', '.join(served)}): a typo?")
    if "approve" in rights and "write" not in rights:
        remarks.append("approve without write does nothing (approving is part of sending a leave request)")
    return Grant(schools, frozenset(rights), number), None, remarks


def parse_tokens(text: str, served: list[str]) -> ParsedTokens:
    """Read a token file's text; problems name the line, never the token."""
    parsed = ParsedTokens()
    seen: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        token = fields[0]
        if token.startswith(("schools=", "rights=")):
            parsed.problems.append(f"line {number} is not used: it has no token; a line is {LINE_FORMAT}")
            continue
        if len(token) < MIN_TOKEN_LENGTH:
            parsed.problems.append(f"line {number} is not used: a token is at least {MIN_TOKEN_LENGTH} characters")
            continue
        secret = token.encode("utf-8")
        if secret in seen:
            parsed.problems.append(f"line {number} is not used: it repeats the token of line {seen[secret]}")
            continue
        seen[secret] = number
        if len(fields) == 1:
            parsed.unscoped.append((secret, number))
            parsed.problems.append(
                f"line {number} is not used: it has no scopes (the format before schools and rights); write it as "
                f"{LINE_FORMAT}"
            )
            continue
        grant, problem, remarks = _parse_line(number, fields[1:], served)
        if grant is None:
            parsed.problems.append(f"line {number} is not used: {problem}")
            continue
        parsed.grants.append((secret, grant))
        parsed.problems += [f"line {number}: {remark}" for remark in remarks]
    return parsed


class TokenFile:
    """The configured token file, read again whenever its size, time or inode change."""

    def __init__(self, path: Path | None, served: list[str] | None = None) -> None:
        self.path = path
        self.served = list(served or [])
        self._seen: tuple[int, int, int] | None = None
        self._parsed = ParsedTokens()
        self._problem: str | None = None
        self._refused = 0
        self._warned_at = 0.0

    def tokens(self) -> list[tuple[bytes, Grant]]:
        """The usable token lines; :class:`NoTokens` says why there are none and how to fix it."""
        if self.path is None:
            raise NoTokens(f"the hub's API has no tokens: {HOW_TO_CONFIGURE}, then restart the hub")
        try:
            info = self.path.stat()
        except OSError as exc:
            self._seen = None
            raise NoTokens(
                f"the hub's API has no tokens: api.token_file {self.path}: {exc.strerror}; {HOW_TO_CONFIGURE}"
            ) from None
        key = (info.st_mtime_ns, info.st_size, info.st_ino)
        if key != self._seen:
            self._load(info)
            self._seen = key
        if self._problem is not None:
            raise NoTokens(f"the hub's API has no tokens: {self._problem}; {HOW_TO_CONFIGURE}")
        return self._parsed.grants

    def _load(self, info: os.stat_result) -> None:
        assert self.path is not None
        try:
            text = self.path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self._parsed = ParsedTokens()
            self._problem = f"api.token_file {self.path}: {getattr(exc, 'strerror', None) or exc}"
            return
        self._parsed = parse_tokens(text, self.served)
        for problem in self._parsed.problems:
            log.warning("hub API: %s %s", self.path, problem)
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("hub API: %s can be read by other users of this server; chmod 600 it", self.path)
        usable = len(self._parsed.grants)
        self._problem = None if usable else f"api.token_file {self.path} holds no token the hub can use"
        log.info("hub API: %d token(s) from %s", usable, self.path)

    def check(self, presented: str) -> Caller:
        """The caller whose token this is; every line is compared, in constant time each.

        Raises :class:`Refused` with what the caller may be told: a wrong token, or one whose line has no scopes.
        """
        given = presented.encode("utf-8")
        found: Grant | None = None
        for token, grant in self.tokens():
            if hmac.compare_digest(given, token):
                found = grant
        unscoped = 0
        for token, number in self._parsed.unscoped:
            if hmac.compare_digest(given, token):
                unscoped = number
        if found is not None:
            return Caller(fingerprint(given), found)
        self._count_refusal()
        if unscoped:
            raise Refused(
                f"this token's line in the hub's api.token_file (line {unscoped}) has no scopes, so it is not used: "
                f"the hub's administrator must write it as {LINE_FORMAT}"
            )
        raise Refused("the token is not valid")

    def _count_refusal(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning("hub API: refused %d request(s) with a wrong token", self._refused)
            self._warned_at, self._refused = now, 0
