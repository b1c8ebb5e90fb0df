"""Ed25519 signatures on hub -> gate messages.

A downlink message changes who may enter a school (roster) or how the gate decides, so a
gate obeys only messages signed with the hub's private key; the public half sits in the
gate's config. The signature covers the canonical JSON of the whole envelope minus ``sig``
(sorted keys, no spaces, UTF-8, Python's json number formatting), so both ends compute the same
bytes whatever the order or spacing of the message as sent.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SignatureError(Exception):
    """A message that must not be obeyed: unsigned, badly signed, or signed by another key."""


class SigningKeyError(Exception):
    """A key that cannot be read; the message says which file and why."""


def canonical(envelope: dict[str, Any]) -> bytes:
    """The signed bytes: everything but ``sig``, in one deterministic encoding."""
    body = {k: v for k, v in envelope.items() if k != "sig"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(private_key: Ed25519PrivateKey, envelope: dict[str, Any]) -> dict[str, Any]:
    """A copy of the envelope with its signature (base64) in ``sig``."""
    signature = private_key.sign(canonical(envelope))
    return {**envelope, "sig": base64.b64encode(signature).decode("ascii")}


def verify(public_key: Ed25519PublicKey, envelope: dict[str, Any]) -> None:
    """Raise SignatureError unless ``sig`` is the hub's signature of this very envelope."""
    sig = envelope.get("sig")
    if not isinstance(sig, str) or not sig:
        raise SignatureError("message is not signed")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signature is not base64") from None
    try:
        signed = canonical(envelope)
    except (UnicodeEncodeError, TypeError, ValueError):
        raise SignatureError("message cannot be put in canonical form (bad characters or values)") from None
    try:
        public_key.verify(raw, signed)
    except InvalidSignature:
        raise SignatureError("signature does not match the hub's key (tampered, or signed by another key)") from None


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """The 32 raw bytes in base64: short enough to paste into gate.toml."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from base64 of the 32 raw bytes, or from PEM."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("PEM key is not an Ed25519 public key")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 (expected the 32-byte Ed25519 public key in base64, or PEM)") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, this one has {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(text: str | None, path: Path | None) -> Ed25519PublicKey | None:
    """The hub's key from the config (inline or file); None when neither is set."""
    if path is not None:
        try:
            text = path.read_text("ascii")
        except OSError as exc:
            raise SigningKeyError(f"{path}: cannot read the hub's public key: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise SigningKeyError(f"{path}: not a text key file (base64 or PEM)") from None
    if text is None:
        return None
    try:
        return parse_public_key(text)
    except ValueError as exc:
        where = str(path) if path else "sync.hub_public_key"
        raise SigningKeyError(f"{where}: {exc}") from None


def generate_private_key(path: Path) -> Ed25519PrivateKey:
    """A new signing key written as PEM with mode 0600 (refuses to overwrite an existing key)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the signing key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise SigningKeyError(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 key")
    return key
