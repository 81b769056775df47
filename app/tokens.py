"""The opaque `encrypted_content` token a client passes back to use a compacted cache.

It binds a handle, a tenant and an expiry, is authenticated with the server secret, and hides the handle so a
client cannot read or forge one. `cryptography` (for AES-GCM) is not a dependency, so this is stdlib-only
encrypt-then-MAC: the payload is XORed with an HMAC-SHA256 keystream (counter mode keyed by a derived encryption
key and a random 128-bit nonce), then nonce and ciphertext are authenticated with HMAC-SHA256 under a second
derived key. Format: ``kvc1.`` + unpadded URL-safe base64 of ``nonce | ciphertext | tag``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass

TOKEN_PREFIX = "kvc1."
_NONCE_BYTES = 16
_TAG_BYTES = 32
_MIN_SECRET_BYTES = 16
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class InvalidTokenError(Exception):
    """A token that was not minted by this server with this secret (tampered, truncated, garbage)."""


@dataclass(frozen=True)
class TokenClaims:
    """What a valid token asserts."""

    handle: str
    tenant: str
    expires_at: int


def new_handle() -> str:
    """A fresh 128-bit random handle, as 32 hex characters."""
    return secrets.token_hex(16)


def mint_token(secret: bytes, handle: str, tenant: str, expires_at: int) -> str:
    """Encrypt and authenticate (handle, tenant, expires_at) under `secret`."""
    enc_key, mac_key = _derive_keys(secret)
    nonce = secrets.token_bytes(_NONCE_BYTES)
    plaintext = json.dumps([handle, tenant, int(expires_at)], separators=(",", ":")).encode()
    ciphertext = _xor(plaintext, _keystream(enc_key, nonce, len(plaintext)))
    body = nonce + ciphertext
    token_bytes = body + _tag(mac_key, body)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(token_bytes).rstrip(b"=").decode("ascii")


def open_token(secret: bytes, token: str) -> TokenClaims:
    """Verify and decrypt a token; any alteration or garbage raises InvalidTokenError (expiry is not checked)."""
    enc_key, mac_key = _derive_keys(secret)
    raw = _decode(token)
    if len(raw) <= _NONCE_BYTES + _TAG_BYTES:
        raise InvalidTokenError("token is too short")
    body, tag = raw[:-_TAG_BYTES], raw[-_TAG_BYTES:]
    if not hmac.compare_digest(tag, _tag(mac_key, body)):
        raise InvalidTokenError("token authentication failed")
    nonce, ciphertext = body[:_NONCE_BYTES], body[_NONCE_BYTES:]
    plaintext = _xor(ciphertext, _keystream(enc_key, nonce, len(ciphertext)))
    try:
        handle, tenant, expires_at = json.loads(plaintext)
    except (ValueError, TypeError) as exc:  # only reachable with a forged tag, i.e. a leaked secret or a bug
        raise InvalidTokenError("token payload is malformed") from exc
    if not (isinstance(handle, str) and isinstance(tenant, str) and type(expires_at) is int):
        raise InvalidTokenError("token payload is malformed")
    return TokenClaims(handle=handle, tenant=tenant, expires_at=expires_at)


def is_expired(claims: TokenClaims, now: float) -> bool:
    """True once `now` (unix seconds) has reached the token's expiry."""
    return now >= claims.expires_at


def _derive_keys(secret: bytes) -> tuple[bytes, bytes]:
    """Independent encryption and MAC keys from one server secret."""
    if len(secret) < _MIN_SECRET_BYTES:
        raise ValueError(f"token secret must be at least {_MIN_SECRET_BYTES} bytes")
    return (
        hmac.new(secret, b"kvc1 token encryption", hashlib.sha256).digest(),
        hmac.new(secret, b"kvc1 token authentication", hashlib.sha256).digest(),
    )


def _keystream(key: bytes, nonce: bytes, length: int) -> bytes:
    """HMAC-SHA256 in counter mode: block i is HMAC(key, nonce | i)."""
    blocks = (hmac.new(key, nonce + i.to_bytes(4, "big"), hashlib.sha256).digest() for i in range(-(-length // 32)))
    return b"".join(blocks)[:length]


def _xor(data: bytes, stream: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(data, stream))


def _tag(mac_key: bytes, body: bytes) -> bytes:
    """MAC over the format prefix too, so a token cannot be replayed under another format version."""
    return hmac.new(mac_key, TOKEN_PREFIX.encode() + body, hashlib.sha256).digest()


def _decode(token: str) -> bytes:
    """Strict base64url: only the canonical spelling of a byte string is accepted (no junk, no padding games)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        raise InvalidTokenError("not a compaction token")
    text = token[len(TOKEN_PREFIX) :]
    if not _BASE64URL.fullmatch(text):
        raise InvalidTokenError("token is not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise InvalidTokenError("token is not base64url") from exc
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != text:
        raise InvalidTokenError("token is not canonical base64url")
    return raw
