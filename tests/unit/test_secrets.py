"""Tests for fleet/server/secrets.py: the key file and SecretBox."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fleet.server.security.secrets import (
    KEY_BYTES,
    NONCE_BYTES,
    SecretBox,
    SecretError,
    create_key_file,
    load_key_file,
)

AAD = "repo:1:password"
TAG_BYTES = 16  # Poly1305


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "secret.key"


@pytest.fixture
def box(key_path: Path) -> SecretBox:
    create_key_file(key_path)
    return load_key_file(key_path)


def write_key(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(mode)


# --- key file ---------------------------------------------------------------


def test_key_size_is_32() -> None:
    assert KEY_BYTES == 32
    assert NONCE_BYTES == 24  # XChaCha20


def test_create_key_file_writes_32_random_bytes_mode_0600(tmp_path: Path) -> None:
    a, b = tmp_path / "a.key", tmp_path / "b.key"
    old_umask = os.umask(0)  # the mode must not depend on a permissive umask
    try:
        create_key_file(a)
    finally:
        os.umask(old_umask)
    create_key_file(b)
    for path in (a, b):
        assert len(path.read_bytes()) == 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert a.read_bytes() != b.read_bytes()
    assert a.read_bytes() != bytes(32)


def test_create_key_file_refuses_an_existing_file(key_path: Path) -> None:
    create_key_file(key_path)
    before = key_path.read_bytes()
    with pytest.raises(SecretError, match="already exists"):
        create_key_file(key_path)
    assert key_path.read_bytes() == before


def test_create_key_file_refuses_any_existing_file(key_path: Path) -> None:
    key_path.write_bytes(b"not a key")
    with pytest.raises(SecretError, match="already exists"):
        create_key_file(key_path)
    assert key_path.read_bytes() == b"not a key"


def test_created_key_loads_and_works(key_path: Path) -> None:
    create_key_file(key_path)
    one, two = load_key_file(key_path), load_key_file(key_path)
    assert two.decrypt(one.encrypt("s3cret", AAD), AAD) == "s3cret"


def test_load_key_file_missing(key_path: Path) -> None:
    with pytest.raises(SecretError, match="does not exist") as info:
        load_key_file(key_path)
    assert str(key_path) in str(info.value)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_load_key_file_wrong_size(key_path: Path, size: int) -> None:
    write_key(key_path, os.urandom(size))
    with pytest.raises(SecretError, match=rf"holds {size} bytes, a key is 32") as info:
        load_key_file(key_path)
    assert str(key_path) in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_load_key_file_readable_by_others(key_path: Path, mode: int) -> None:
    write_key(key_path, os.urandom(32), mode)
    with pytest.raises(SecretError, match=rf"readable by others \(mode {mode:o}\)") as info:
        load_key_file(key_path)
    assert "chmod 600" in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_key_file_owner_only_modes_are_accepted(key_path: Path, mode: int) -> None:
    write_key(key_path, os.urandom(32), mode)
    assert isinstance(load_key_file(key_path), SecretBox)


def test_secret_box_rejects_wrong_key_size() -> None:
    with pytest.raises(SecretError, match="wrong key size"):
        SecretBox(b"\x00" * 31)


# --- encrypt / decrypt ------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "correct horse battery staple",
        "",
        "s3://AKIA:sécret@bucket/path",
        "пароль 密码 🔐",
        "x" * 10_000,
    ],
)
def test_round_trip(box: SecretBox, text: str) -> None:
    blob = box.encrypt(text, AAD)
    assert isinstance(blob, bytes)
    assert box.decrypt(blob, AAD) == text


def test_blob_layout(box: SecretBox) -> None:
    text = "hello"
    blob = box.encrypt(text, AAD)
    assert blob[:1] == b"\x01"
    assert len(blob) == 1 + NONCE_BYTES + len(text.encode()) + TAG_BYTES


def test_decrypt_accepts_memoryview_from_the_database(box: SecretBox) -> None:
    blob = box.encrypt("pw", AAD)
    assert box.decrypt(memoryview(blob), AAD) == "pw"


def test_encryptions_differ_and_hide_the_plaintext(box: SecretBox) -> None:
    text = "a rather recognisable password 12345"
    one, two = box.encrypt(text, AAD), box.encrypt(text, AAD)
    assert one != two
    assert one[1 : 1 + NONCE_BYTES] != two[1 : 1 + NONCE_BYTES]
    for blob in (one, two):
        assert text.encode() not in blob
        assert b"recognisable" not in blob
        assert box.decrypt(blob, AAD) == text


def test_decrypt_with_other_associated_data_fails(box: SecretBox) -> None:
    blob = box.encrypt("pw", "repo:1:password")
    for other in ("repo:2:password", "repo:1:url", "", "repo:1:password "):
        with pytest.raises(SecretError, match="does not decrypt"):
            box.decrypt(blob, other)


def test_decrypt_with_another_key_fails(box: SecretBox) -> None:
    blob = box.encrypt("pw", AAD)
    other = SecretBox(os.urandom(32))
    with pytest.raises(SecretError, match="does not decrypt"):
        other.decrypt(blob, AAD)


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_tampered_byte_fails(box: SecretBox, where: str) -> None:
    blob = bytearray(box.encrypt("some password", AAD))
    index = {"nonce": 5, "ciphertext": 1 + NONCE_BYTES + 2, "tag": len(blob) - 1}[where]
    blob[index] ^= 0x01
    with pytest.raises(SecretError):
        box.decrypt(bytes(blob), AAD)


def test_unknown_format_byte_fails(box: SecretBox) -> None:
    blob = box.encrypt("pw", AAD)
    with pytest.raises(SecretError, match="malformed"):
        box.decrypt(b"\x02" + blob[1:], AAD)


@pytest.mark.parametrize("keep", [0, 1, NONCE_BYTES, 1 + NONCE_BYTES - 1])
def test_truncated_blob_fails_short_of_a_nonce(box: SecretBox, keep: int) -> None:
    blob = box.encrypt("some password", AAD)
    with pytest.raises(SecretError, match="malformed"):
        box.decrypt(blob[:keep], AAD)


def test_truncated_blob_fails_missing_the_last_byte(box: SecretBox) -> None:
    blob = box.encrypt("some password", AAD)
    with pytest.raises(SecretError):
        box.decrypt(blob[:-1], AAD)


@pytest.mark.parametrize("after_nonce", [0, 1, TAG_BYTES - 1])
def test_truncated_blob_shorter_than_the_tag_raises_secret_error(
    box: SecretBox, after_nonce: int
) -> None:
    blob = box.encrypt("some password", AAD)
    with pytest.raises(SecretError):
        box.decrypt(blob[: 1 + NONCE_BYTES + after_nonce], AAD)


def test_repr_does_not_show_the_key(key_path: Path) -> None:
    create_key_file(key_path)
    key = key_path.read_bytes()
    box = load_key_file(key_path)
    text = repr(box) + str(box)
    assert key.hex() not in text
    assert repr(key) not in text
    assert str(key) not in text
    assert text.startswith("SecretBox(")
