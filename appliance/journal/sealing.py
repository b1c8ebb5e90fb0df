"""Encryption at rest for biometric templates (AES-256-GCM, key in a file only the service user reads).

Face templates of children are sensitive personal data (Decree 13/2023/ND-CP): a copied
journal file must not give them away. Each template is sealed with its own nonce and bound
to its person and model as associated data, so a blob moved to another person fails to open.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12


class SealingError(Exception):
    """The key is missing, unsafe, or a sealed blob does not open with it."""


def load_or_create_key(path: Path) -> bytes:
    """Read the key, creating it (mode 0600) on first use; refuse a key others can read."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as out:
                out.write(secrets.token_bytes(KEY_BYTES))
                out.flush()
                os.fsync(out.fileno())
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SealingError(f"{path}: template key is readable by other users; run: chmod 600 {path}")
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise SealingError(f"{path}: not a template key ({len(key)} bytes, expected {KEY_BYTES})")
    return key


class Sealer:
    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @classmethod
    def from_file(cls, path: Path) -> Sealer:
        return cls(load_or_create_key(path))

    def seal(self, data: bytes, context: str) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, context.encode())

    def open(self, blob: bytes, context: str) -> bytes:
        try:
            return self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context.encode())
        except (InvalidTag, ValueError):
            raise SealingError(
                "a face template does not open with this key (wrong key file or tampered data)"
            ) from None
