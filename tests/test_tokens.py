"""Opaque compaction tokens: round trip, confidentiality of the handle, and refusal of any tampering."""

from __future__ import annotations

import base64

import pytest

from app.tokens import (
    TOKEN_PREFIX,
    InvalidTokenError,
    TokenClaims,
    is_expired,
    mint_token,
    new_handle,
    open_token,
)

SECRET = b"s" * 32


def test_round_trip():
    handle = new_handle()
    token = mint_token(SECRET, handle, "tenant-a", 1_900_000_000)
    assert token.startswith(TOKEN_PREFIX)
    assert open_token(SECRET, token) == TokenClaims(handle=handle, tenant="tenant-a", expires_at=1_900_000_000)


def test_handle_and_tenant_are_not_readable():
    handle = new_handle()
    token = mint_token(SECRET, handle, "tenant-visible", 1_900_000_000)
    raw = base64.urlsafe_b64decode(token[len(TOKEN_PREFIX) :] + "==")
    for secret_text in (handle, "tenant-visible"):
        assert secret_text not in token and secret_text.encode() not in raw


def test_tokens_are_url_safe_and_randomized():
    first = mint_token(SECRET, "h", "t", 1)
    second = mint_token(SECRET, "h", "t", 1)
    assert first != second  # fresh nonce each time
    assert all(c.isalnum() or c in "-_." for c in first)


def test_new_handle_is_128_bit_hex():
    handles = {new_handle() for _ in range(100)}
    assert len(handles) == 100
    assert all(len(h) == 32 and int(h, 16) >= 0 for h in handles)


def test_every_single_character_change_is_refused():
    token = mint_token(SECRET, new_handle(), "t", 1_900_000_000)
    for i in range(len(token)):
        replacement = "A" if token[i] != "A" else "B"
        with pytest.raises(InvalidTokenError):
            open_token(SECRET, token[:i] + replacement + token[i + 1 :])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t[:-1],
        lambda t: t + "A",
        lambda t: t + "=",
        lambda t: t + "!",
        lambda t: t.replace(TOKEN_PREFIX, "kvc2."),
        lambda t: t[len(TOKEN_PREFIX) :],
        lambda t: TOKEN_PREFIX,
        lambda t: TOKEN_PREFIX + "A" * 40,
        lambda t: "",
        lambda t: "garbage",
    ],
)
def test_malformed_tokens_are_refused(mutate):
    with pytest.raises(InvalidTokenError):
        open_token(SECRET, mutate(mint_token(SECRET, "h", "t", 5)))


def test_other_secret_is_refused():
    token = mint_token(SECRET, "h", "t", 5)
    with pytest.raises(InvalidTokenError):
        open_token(b"x" * 32, token)


def test_short_secret_is_a_configuration_error():
    with pytest.raises(ValueError):
        mint_token(b"short", "h", "t", 5)


def test_expiry():
    claims = TokenClaims(handle="h", tenant="t", expires_at=100)
    assert not is_expired(claims, 99.5)
    assert is_expired(claims, 100)
