"""SecretBox sealing with key rotation, and keyed hashes."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography.fernet import Fernet
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.crypto import SealError, SecretBox, constant_time_equal, keyed_hash, mac, sha256_hex

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()
OTHER = Fernet.generate_key().decode()
PAYLOAD = {"token": "tok-abc", "code": "012345"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=50)
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_seal_open_round_trip(payload: dict[str, object]) -> None:
    box = SecretBox(NEW)
    assert box.open(box.seal(payload)) == payload


def test_sealed_text_hides_the_secret_and_is_randomised() -> None:
    box = SecretBox(NEW)
    a, b = box.seal(PAYLOAD), box.seal(PAYLOAD)
    assert a != b
    for secret in PAYLOAD.values():
        assert secret not in a
    assert re.fullmatch(r"[A-Za-z0-9_=-]+", a)


def test_rotation_new_key_encrypts_old_key_still_opens() -> None:
    before = SecretBox(OLD).seal(PAYLOAD)
    rotated = SecretBox(f"{NEW}, {OLD}")
    assert rotated.open(before) == PAYLOAD
    after = rotated.seal(PAYLOAD)
    assert SecretBox(NEW).open(after) == PAYLOAD
    with pytest.raises(SealError):
        SecretBox(OLD).open(after)  # the old key is no longer used to encrypt


def test_key_list_tolerates_spaces_and_empty_items() -> None:
    sealed = SecretBox(OLD).seal(PAYLOAD)
    assert SecretBox(f" {NEW} ,, {OLD} ,").open(sealed) == PAYLOAD


def test_wrong_key_raises_seal_error() -> None:
    sealed = SecretBox(NEW).seal(PAYLOAD)
    with pytest.raises(SealError):
        SecretBox(OTHER).open(sealed)


def test_tampered_ciphertext_raises_seal_error() -> None:
    box = SecretBox(NEW)
    raw = bytearray(base64.urlsafe_b64decode(box.seal(PAYLOAD)))
    for position in (0, 9, 30, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[position] ^= 0x01
        with pytest.raises(SealError):
            box.open(base64.urlsafe_b64encode(bytes(flipped)).decode())


@pytest.mark.parametrize("garbage", ["", "not-a-token", "gAAAAA", "é" * 10, "=" * 8])
def test_garbage_raises_seal_error(garbage: str) -> None:
    with pytest.raises(SealError):
        SecretBox(NEW).open(garbage)


@pytest.mark.parametrize("inner", [b"[1, 2]", b'"text"', b"42", b"not json", b"\xff\xfe"])
def test_sealed_non_object_raises_seal_error(inner: bytes) -> None:
    box = SecretBox(NEW)
    with pytest.raises(SealError):
        box.open(box.seal_bytes(inner))


def test_seal_error_carries_no_ciphertext_detail() -> None:
    sealed = SecretBox(NEW).seal(PAYLOAD)
    with pytest.raises(SealError) as info:
        SecretBox(OTHER).open(sealed)
    assert sealed not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("keys", ["", " ", ",", " , "])
def test_no_keys_rejected(keys: str) -> None:
    with pytest.raises(ValueError):
        SecretBox(keys)


def test_malformed_key_rejected() -> None:
    with pytest.raises(ValueError):
        SecretBox("too-short")


def test_seal_bytes_opens_as_the_object_it_encodes() -> None:
    box = SecretBox(NEW)
    assert box.open(box.seal_bytes(b'{"new_password":"Abc123"}')) == {"new_password": "Abc123"}


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
