"""SecretBox sealing with key rotation, bound to a purpose and a context, with a lifetime; keyed hashes."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Mapping

import pytest
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.crypto import (
    Purpose,
    SealError,
    SealExpired,
    SealMismatch,
    SecretBox,
    constant_time_equal,
    initial_key_context,
    keyed_hash,
    mac,
    new_key_context,
    recipient_hash,
    recovery_secrets_context,
    sha256_hex,
)

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()
OTHER = Fernet.generate_key().decode()
PAYLOAD = {"token": "tok-abc", "code": "012345"}
PURPOSE = Purpose.RECOVERY_SECRETS
CONTEXT = recovery_secrets_context(token_id="t-1", account_id="a-1", request_id="r-1", email="ana@example.org")


def seal(box: SecretBox, payload: Mapping[str, object] = PAYLOAD, *, at: int | None = None) -> str:
    return box.seal(dict(payload), purpose=PURPOSE, context=CONTEXT, at=at)


def open_(
    box: SecretBox, sealed: str, *, context: Mapping[str, str] = CONTEXT, ttl_s: int | None = 60
) -> dict[str, object]:
    return box.open(sealed, purpose=PURPOSE, context=context, ttl_s=ttl_s)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=50)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_seal_open_round_trip(payload: dict[str, object]) -> None:
    box = SecretBox(NEW)
    assert open_(box, seal(box, payload)) == payload


def test_sealed_text_hides_the_secret_and_its_context_and_is_randomised() -> None:
    box = SecretBox(NEW)
    a, b = seal(box), seal(box)
    assert a != b
    for secret in (*PAYLOAD.values(), *CONTEXT.values(), "ana@example.org"):
        assert secret not in a
    assert re.fullmatch(r"[A-Za-z0-9_=-]+", a)


def test_rotation_new_key_encrypts_old_key_still_opens() -> None:
    before = seal(SecretBox(OLD))
    rotated = SecretBox(f"{NEW}, {OLD}")
    assert open_(rotated, before) == PAYLOAD
    after = seal(rotated)
    assert open_(SecretBox(NEW), after) == PAYLOAD
    with pytest.raises(SealError):
        open_(SecretBox(OLD), after)  # the old key is no longer used to encrypt


def test_key_list_tolerates_spaces_and_empty_items() -> None:
    sealed = seal(SecretBox(OLD))
    assert open_(SecretBox(f" {NEW} ,, {OLD} ,"), sealed) == PAYLOAD


def test_wrong_key_raises_seal_error_not_a_mismatch() -> None:
    sealed = seal(SecretBox(NEW))
    with pytest.raises(SealError) as info:
        open_(SecretBox(OTHER), sealed)
    assert type(info.value) is SealError


def test_tampered_ciphertext_raises_seal_error() -> None:
    box = SecretBox(NEW)
    raw = bytearray(base64.urlsafe_b64decode(seal(box)))
    for position in (0, 9, 30, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[position] ^= 0x01
        with pytest.raises(SealError):
            open_(box, base64.urlsafe_b64encode(bytes(flipped)).decode())


@pytest.mark.parametrize("garbage", ["", "not-a-token", "gAAAAA", "é" * 10, "=" * 8])
def test_garbage_raises_seal_error(garbage: str) -> None:
    with pytest.raises(SealError):
        open_(SecretBox(NEW), garbage)


@pytest.mark.parametrize(
    "inner", [b"[1, 2]", b'"text"', b"42", b"not json", b"\xff\xfe", b'{"purpose":"x","context":{},"data":[]}']
)
def test_sealed_non_object_raises_seal_error(inner: bytes) -> None:
    box = SecretBox(NEW)
    with pytest.raises(SealError):
        open_(box, box.seal_bytes(inner))


def test_seal_error_carries_no_ciphertext_detail() -> None:
    sealed = seal(SecretBox(NEW))
    with pytest.raises(SealError) as info:
        open_(SecretBox(OTHER), sealed)
    assert sealed not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("keys", ["", " ", ",", " , "])
def test_no_keys_rejected(keys: str) -> None:
    with pytest.raises(ValueError):
        SecretBox(keys)


def test_malformed_key_rejected() -> None:
    with pytest.raises(ValueError):
        SecretBox("too-short")


def test_seal_bytes_round_trip() -> None:
    box = SecretBox(NEW)
    assert box.open_bytes(box.seal_bytes(b"\x00raw bytes")) == b"\x00raw bytes"


# ------------------------------------------------------------------ binding to a context


@pytest.mark.parametrize("field", ["token_id", "account_id", "request_id"])
def test_a_blob_for_another_event_is_a_mismatch_naming_only_the_field(field: str) -> None:
    box = SecretBox(NEW)
    sealed = seal(box)
    with pytest.raises(SealMismatch) as info:
        open_(box, sealed, context={**CONTEXT, field: "victim-value"})
    assert field in str(info.value)
    assert "victim-value" not in str(info.value) and "t-1" not in str(info.value)


def test_link_and_code_readdressed_to_another_recipient_do_not_open() -> None:
    box = SecretBox(NEW)
    sealed = seal(box)
    other = recovery_secrets_context(token_id="t-1", account_id="a-1", request_id="r-1", email="eve@example.org")
    with pytest.raises(SealMismatch) as info:
        open_(box, sealed, context=other)
    assert "recipient" in str(info.value) and "eve" not in str(info.value)
    assert recipient_hash("ana@example.org") != recipient_hash("eve@example.org")


def test_a_new_key_never_opens_as_recovery_secrets_nor_as_an_initial_key() -> None:
    box = SecretBox(NEW)
    ctx = new_key_context(token_id="t-1", account_id="a-1", request_id="r-1")
    sealed = box.seal({"new_password": "Nueva2024"}, purpose=Purpose.NEW_KEY, context=ctx)
    assert box.open(sealed, purpose=Purpose.NEW_KEY, context=ctx, ttl_s=60) == {"new_password": "Nueva2024"}
    with pytest.raises(SealMismatch, match="purpose"):
        box.open(sealed, purpose=Purpose.RECOVERY_SECRETS, context=ctx, ttl_s=60)
    with pytest.raises(SealMismatch, match="purpose"):
        box.open(sealed, purpose=Purpose.INITIAL_KEY, context=initial_key_context(account_id="a-1"), ttl_s=60)


def test_an_initial_key_is_bound_to_its_account() -> None:
    box = SecretBox(NEW)
    sealed = box.seal(
        {"password": "Inicial2024"}, purpose=Purpose.INITIAL_KEY, context=initial_key_context(account_id="a-1")
    )
    opened = box.open(sealed, purpose=Purpose.INITIAL_KEY, context=initial_key_context(account_id="a-1"), ttl_s=None)
    assert opened == {"password": "Inicial2024"}
    with pytest.raises(SealMismatch, match="account_id"):
        box.open(sealed, purpose=Purpose.INITIAL_KEY, context=initial_key_context(account_id="a-2"), ttl_s=None)


def test_a_context_with_other_fields_is_a_mismatch() -> None:
    box = SecretBox(NEW)
    sealed = seal(box)
    with pytest.raises(SealMismatch):
        open_(box, sealed, context={k: v for k, v in CONTEXT.items() if k != "recipient"})
    with pytest.raises(SealMismatch):
        open_(box, sealed, context={**CONTEXT, "extra": "x"})


def test_an_unbound_blob_of_before_the_binding_does_not_open() -> None:
    box = SecretBox(NEW)
    legacy = box.seal_bytes(b'{"token":"tok-abc","code":"012345"}')
    with pytest.raises(SealError):
        open_(box, legacy)


# ------------------------------------------------------------------ lifetime


def test_a_blob_older_than_its_lifetime_is_expired() -> None:
    box = SecretBox(NEW)
    old = seal(box, at=int(time.time()) - 120)
    assert open_(box, old, ttl_s=300) == PAYLOAD
    with pytest.raises(SealExpired):
        open_(box, old, ttl_s=60)
    assert open_(box, old, ttl_s=None) == PAYLOAD  # no lifetime asked: the sender's retries


def test_a_blob_dated_in_the_future_is_refused() -> None:
    box = SecretBox(NEW)
    with pytest.raises(SealExpired):
        open_(box, seal(box, at=int(time.time()) + 3600), ttl_s=60)


def test_a_mismatch_is_reported_before_the_age() -> None:
    box = SecretBox(NEW)
    old = seal(box, at=int(time.time()) - 3600)
    with pytest.raises(SealMismatch):
        open_(box, old, context={**CONTEXT, "account_id": "a-2"}, ttl_s=60)


# ------------------------------------------------------------------ hashes


@given(st.text(max_size=30))
def test_keyed_hash_stable_and_key_dependent(value: str) -> None:
    h = keyed_hash("k1", value)
    assert h == keyed_hash("k1", value)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert h != keyed_hash("k2", value)
    assert h != sha256_hex(value)


def test_keyed_hash_distinguishes_values() -> None:
    assert keyed_hash("k", "1710034065") != keyed_hash("k", "1710034066")
    assert "1710034065" not in keyed_hash("k", "1710034065")


def test_sha256_hex_accepts_str_and_bytes() -> None:
    assert sha256_hex("abc") == sha256_hex(b"abc")
    assert sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_mac_matches_keyed_hash_for_text() -> None:
    assert mac("k", b"v") == keyed_hash("k", "v")
    assert mac("k", b"v") != mac("k", b"w")


def test_constant_time_equal() -> None:
    assert constant_time_equal("abc", "abc")
    assert not constant_time_equal("abc", "abd")
    assert not constant_time_equal("abc", "abcd")
    assert constant_time_equal("ñ", "ñ")
