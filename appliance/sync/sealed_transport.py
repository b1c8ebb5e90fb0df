"""Face templates and rosters sealed to one gate for their way through the broker (X25519, HKDF-SHA256,
AES-256-GCM).

The hub's roster and templates messages are retained, so Mosquitto keeps them in mosquitto.db on
the school server, and queues them for gates that are away: children's faces, names and card
numbers. Sealed to the gate's own key they are ciphertext there. One field of the body is sealed
(``SEALED_FIELD``); ids to remove or deactivate, and the model's name, stay readable. The gate's
X25519 key is derived from its template key file (the one that already seals templates in its
journal): nothing new to provision or lose. The gate puts the public half in its
retained status, which only its own login may write, and the hub seals to what it finds there.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.journal.sealing import load_or_create_key

DERIVE_INFO = b"edugate gate transport key v1"
STATUS_INFO = b"edugate gate status signing key v1"
SEAL_INFO = b"edugate sealed templates v1"
NONCE_BYTES = 12


class TransportSealError(Exception):
    """A sealed body does not open: another gate's key, a changed key, or tampered data."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TransportSealError(f"{what} is not base64") from None


# The body field that travels sealed, per message type.
SEALED_FIELD = {"templates": "set", "roster.snapshot": "people", "roster.delta": "upsert"}


def sealed_context(message: dict[str, Any]) -> str:
    """What a sealed body is bound to: its type, school, gate, model and version (so it cannot be moved, put in
    another kind of message, or replayed)."""
    bound = f"{message['school']}/{message['device']}/{message['body'].get('model')}/{message.get('version')}"
    kind = message.get("type", "templates")
    return bound if kind == "templates" else f"{kind}/{bound}"


def gate_private_key(template_key_file: Path) -> X25519PrivateKey:
    """The gate's transport key, derived from its template key (created 0600 on first use, like the journal's)."""
    seed = HKDF(SHA256(), 32, salt=None, info=DERIVE_INFO).derive(load_or_create_key(template_key_file))
    return X25519PrivateKey.from_private_bytes(seed)


def gate_signing_key(template_key_file: Path) -> Ed25519PrivateKey:
    """The key the gate signs its status with (appliance.sync.gate_keys), derived from the same file: a gate
    whose key file is replaced presents new keys on both counts, and the hub holds them until IT approves."""
    seed = HKDF(SHA256(), 32, salt=None, info=STATUS_INFO).derive(load_or_create_key(template_key_file))
    return Ed25519PrivateKey.from_private_bytes(seed)


def public_text(private: X25519PrivateKey) -> str:
    """What the gate's status carries: base64 of the 32-byte public key."""
    return _b64(private.public_key().public_bytes_raw())


def _aead(shared: bytes, ephemeral: bytes, recipient: bytes) -> AESGCM:
    return AESGCM(HKDF(SHA256(), 32, salt=ephemeral + recipient, info=SEAL_INFO).derive(shared))


def seal(recipient: str, plaintext: bytes, context: str) -> dict[str, str]:
    """Seal ``plaintext`` to the gate whose public key is ``recipient``; ``context`` binds it to its message."""
    recipient_raw = _unb64(recipient, "the gate's template key")
    try:
        peer = X25519PublicKey.from_public_bytes(recipient_raw)
    except ValueError:
        raise TransportSealError("the gate's template key is not an X25519 public key") from None
    ephemeral = X25519PrivateKey.generate()
    ephemeral_raw = ephemeral.public_key().public_bytes_raw()
    nonce = secrets.token_bytes(NONCE_BYTES)
    data = _aead(ephemeral.exchange(peer), ephemeral_raw, recipient_raw).encrypt(nonce, plaintext, context.encode())
    return {"to": recipient, "epk": _b64(ephemeral_raw), "nonce": _b64(nonce), "data": _b64(data)}


def open_sealed(private: X25519PrivateKey, sealed: dict[str, str], context: str) -> bytes:
    mine = public_text(private)
    if sealed.get("to") != mine:
        raise TransportSealError(
            "sealed to another template key (the gate's key file changed since the hub read its status); "
            "publish again from the hub"
        )
    ephemeral_raw = _unb64(sealed.get("epk", ""), "epk")
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_raw))
        aead = _aead(shared, ephemeral_raw, base64.b64decode(mine))
        return aead.decrypt(
            _unb64(sealed.get("nonce", ""), "nonce"), _unb64(sealed.get("data", ""), "data"), context.encode()
        )
    except (InvalidTag, ValueError):
        raise TransportSealError("sealed templates do not open with this gate's key (tampered or not for it)") from None
