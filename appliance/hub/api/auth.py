"""Bearer tokens for the hub's API: a file of tokens, one per line, re-read when it changes.

The file is the only place tokens live: adding or revoking an integration is an edit of the
file (no restart). Tokens are compared in constant time and never logged; what the hub records
of a caller (e.g. as the source of a leave request) is a short fingerprint of its token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
HOW_TO_CONFIGURE = (
    "set api.token_file in hub.toml to a file holding one bearer token per line, readable by the hub only "
    "(e.g. `openssl rand -hex 32 > /etc/edugate/api.tokens; chmod 600 /etc/edugate/api.tokens`)"
)
WARN_EVERY = 60.0  # seconds between two warnings about refused tokens (a scanner must not flood the log)


class NoTokens(Exception):
    """The API cannot accept anyone: no token file configured, unreadable, or without a usable token."""


@dataclass(frozen=True)
class Caller:
    """Who made a request, as far as the hub may record it."""

    fingerprint: str

    @property
    def source(self) -> str:
        return f"api:{self.fingerprint}"


def fingerprint(token: bytes) -> str:
    """Eight hex digits of the token's SHA-256: tells integrations apart in records without revealing the token."""
    return hashlib.sha256(token).hexdigest()[:8]


class TokenFile:
    """The configured token file, read again whenever its size, time or inode change."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._tokens: list[bytes] = []
        self._problem: str | None = None
        self._refused = 0
        self._warned_at = 0.0

    def tokens(self) -> list[bytes]:
        """The tokens in force; :class:`NoTokens` says why there are none and how to fix it."""
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
        return self._tokens

    def _load(self, info: os.stat_result) -> None:
        assert self.path is not None
        try:
            text = self.path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self._tokens, self._problem = [], f"api.token_file {self.path}: {getattr(exc, 'strerror', None) or exc}"
            return
        tokens: list[bytes] = []
        for number, line in enumerate(text.splitlines(), 1):
            token = line.split("#", 1)[0].strip()
            if not token:
                continue
            if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
                log.warning(
                    "hub API: %s line %d is not used: a token is at least %d characters without spaces",
                    self.path,
                    number,
                    MIN_TOKEN_LENGTH,
                )
                continue
            tokens.append(token.encode("utf-8"))
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("hub API: %s can be read by other users of this server; chmod 600 it", self.path)
        self._tokens = tokens
        self._problem = None if tokens else f"api.token_file {self.path} holds no token"
        log.info("hub API: %d token(s) from %s", len(tokens), self.path)

    def check(self, presented: str) -> Caller | None:
        """The caller if ``presented`` is one of the tokens; every token is compared, in constant time each."""
        given = presented.encode("utf-8")
        match = False
        for token in self.tokens():
            match |= hmac.compare_digest(given, token)
        if match:
            return Caller(fingerprint(given))
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning("hub API: refused %d request(s) with a wrong token", self._refused)
            self._warned_at, self._refused = now, 0
        return None
