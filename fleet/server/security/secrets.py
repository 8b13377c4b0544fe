"""Secrets at rest: one key file and XChaCha20-Poly1305 with associated data.

The key file is created once by `fleetd init` (mode 0600, never overwritten)
and its size is checked on load. Every ciphertext binds the row and field it
belongs to as associated data, so a value copied into another row fails to
decrypt instead of leaking there.
"""

from __future__ import annotations

import os
from pathlib import Path

from nacl import bindings, utils
from nacl.exceptions import CryptoError

KEY_BYTES = bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
NONCE_BYTES = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_BYTES = bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
FORMAT = b"\x01"  # version byte in front of nonce + ciphertext


class SecretError(Exception):
    """The key file is missing or malformed, or a value does not decrypt."""


def create_key_file(path: Path) -> None:
    """Write a new random key with mode 0600; refuse to replace an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretError(
            f"{path} already exists; refusing to overwrite a key (it would orphan every secret)"
        ) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(utils.random(KEY_BYTES))
        fh.flush()
        os.fsync(fh.fileno())


def load_key_file(path: Path) -> SecretBox:
    try:
        st = path.stat()
        key = path.read_bytes()
    except FileNotFoundError:
        raise SecretError(f"{path} does not exist; run 'fleetd init' first") from None
    except OSError as exc:
        raise SecretError(f"cannot read {path}: {exc.strerror}") from None
    if len(key) != KEY_BYTES:
        raise SecretError(
            f"{path} holds {len(key)} bytes, a key is {KEY_BYTES}: damaged or not a key"
        )
    if st.st_mode & 0o077:
        raise SecretError(
            f"{path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it"
        )
    return SecretBox(key)


def repository_aad(base: str, what: str) -> str:
    """The associated data of a repository secret: the row it is bound to
    (the repository's `aad`) and the field, so a ciphertext moved to another
    row or field fails to decrypt."""
    return f"{base}:{what}"


def notifier_aad(notifier_id: int) -> str:
    """A notifier's Apprise URL, bound to its row."""
    return f"notifier:{notifier_id}:url"


def ping_aad(group_id: int) -> str:
    """A source group's ping URL, bound to its row."""
    return f"group:{group_id}:ping_url"


class SecretBox:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretError("wrong key size")
        self._key = key

    def __repr__(self) -> str:  # never show the key
        return "SecretBox(<key>)"

    def encrypt(self, plaintext: str, aad: str) -> bytes:
        nonce = utils.random(NONCE_BYTES)
        sealed = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext.encode(), aad.encode(), nonce, self._key
        )
        return FORMAT + nonce + sealed

    def decrypt(self, blob: bytes, aad: str) -> str:
        blob = bytes(blob)
        if not blob.startswith(FORMAT) or len(blob) < 1 + NONCE_BYTES + TAG_BYTES:
            raise SecretError(f"malformed secret for {aad}")
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            plain = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                sealed, aad.encode(), nonce, self._key
            )
        except CryptoError:
            raise SecretError(
                f"secret for {aad} does not decrypt (wrong key or moved value)"
            ) from None
        return plain.decode()
