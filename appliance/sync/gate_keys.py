"""What a gate says about itself, signed: its status carries its keys and an Ed25519 signature.

A gate has two public keys, both derived from its template key file (appliance.sync.sealed_transport):
the X25519 ``template_key`` the hub seals rosters and faces to, and the Ed25519 ``signing_key`` its
status is signed with. The hub registers both when IT provisions the gate (``edugate hub gates add``)
and believes a status only when it is signed with the registered signing key; a status signed with
another key is a key change, held until IT approves it. The broker's password alone (a stolen gate
login) cannot make the hub seal anything to a key of the thief's choosing.

The signature covers the canonical JSON of the whole status minus ``sig``, as for the hub's downlink
(appliance.sync.signing). The fingerprint is what IT compares between the gate and the hub.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from appliance.sync.signing import SignatureError, sign, verify


class GateKeyError(ValueError):
    """A gate key that is not what it should be (not base64, wrong length, not a curve point)."""


def _raw(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise GateKeyError(f"{what} is not base64") from None
    if len(raw) != 32:
        raise GateKeyError(f"{what} has {len(raw)} bytes, a gate key has 32")
    return raw


def _checked(text: str, what: str, kind: type[X25519PublicKey] | type[Ed25519PublicKey]) -> str:
    try:
        kind.from_public_bytes(_raw(text, what))
    except ValueError as exc:
        raise GateKeyError(f"{what}: {exc}") from None
    return text.strip()


def check_template_key(text: str) -> str:
    """The gate's X25519 public key in its canonical base64, or GateKeyError."""
    return _checked(text, "template key", X25519PublicKey)


def check_signing_key(text: str) -> str:
    """The gate's Ed25519 public key in its canonical base64, or GateKeyError."""
    return _checked(text, "signing key", Ed25519PublicKey)


def fingerprint(template_key: str | None, signing_key: str | None) -> str:
    """16 hex digits in groups of four over both public keys: short enough to read aloud over the phone."""
    digest = hashlib.sha256(f"edugate gate v1\n{template_key or '-'}\n{signing_key or '-'}".encode()).hexdigest()
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def signing_key_text(private: Ed25519PrivateKey) -> str:
    return base64.b64encode(private.public_key().public_bytes_raw()).decode("ascii")


def sign_status(private: Ed25519PrivateKey, status: dict[str, Any]) -> dict[str, Any]:
    """The status with the gate's signing key and its signature over everything else."""
    return sign(private, {**status, "signing_key": signing_key_text(private)})


def verify_status(signing_key: str, status: dict[str, Any]) -> None:
    """SignatureError unless ``status`` is signed with ``signing_key`` (base64 Ed25519 public key)."""
    try:
        public = Ed25519PublicKey.from_public_bytes(_raw(signing_key, "signing key"))
    except (GateKeyError, ValueError) as exc:
        raise SignatureError(f"the signing key cannot be used: {exc}") from None
    verify(public, status)
