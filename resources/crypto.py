"""Token encryption at rest with `cryptography`'s MultiFernet.

Keys come newest first: the first key encrypts, every key decrypts, ``rotate`` re-encrypts old
ciphertext under the newest key. A token dict (OAuth token as returned by the platform, e.g.
``{"access_token", "refresh_token", "expires_at", ...}``) is serialised as JSON and encrypted whole;
the ciphertext is an ASCII string safe to store in MongoDB.
"""
from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from resources.settings import Settings, read_or_create_secret_file


class TokenDecryptionError(RuntimeError):
    """A stored token could not be decrypted with any configured key (wrong or removed key)."""


class TokenCipher:
    """Encrypts and decrypts OAuth token dicts.

    Args:
        keys: Fernet keys (urlsafe base64, 32 bytes), newest first. At least one.

    Raises:
        ValueError: no key, or a key that is not a valid Fernet key (the key itself is never echoed).
    """

    def __init__(self, keys: list[str]):
        keys = [k.strip() for k in keys if k and k.strip()]
        if not keys:
            raise ValueError("TOKEN_ENCRYPTION_KEYS holds no key")
        fernets = []
        for index, key in enumerate(keys):
            try:
                fernets.append(Fernet(key.encode()))
            except (ValueError, TypeError):
                raise ValueError(f"TOKEN_ENCRYPTION_KEYS entry #{index + 1} is not a valid Fernet key") from None
        self._fernet = MultiFernet(fernets)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TokenCipher":
        """Keys from ``TOKEN_ENCRYPTION_KEYS`` (comma-separated), else ``<data_dir>/token.keys``
        (generated once with mode 0600)."""
        raw = settings.token_encryption_keys
        if not raw:
            raw = read_or_create_secret_file(
                settings.data_dir / "token.keys", lambda: Fernet.generate_key().decode()
            )
        return cls(raw.replace("\n", ",").split(","))

    @staticmethod
    def generate_key() -> str:
        """A new random Fernet key (to put in front of ``TOKEN_ENCRYPTION_KEYS`` when rotating)."""
        return Fernet.generate_key().decode()

    def encrypt(self, token: dict[str, Any]) -> str:
        """Encrypt a JSON-serialisable token dict; returns Fernet ciphertext (str)."""
        return self._fernet.encrypt(json.dumps(token, sort_keys=True).encode()).decode()

    def decrypt(self, ciphertext: str) -> dict[str, Any]:
        """Decrypt ciphertext made by ``encrypt``.

        Raises:
            TokenDecryptionError: no configured key decrypts it (message holds no secret).
        """
        try:
            return json.loads(self._fernet.decrypt(ciphertext.encode()))
        except (InvalidToken, ValueError, TypeError):
            raise TokenDecryptionError("stored token cannot be decrypted with the configured keys") from None

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt ciphertext under the newest key (old keys can then be retired)."""
        try:
            return self._fernet.rotate(ciphertext.encode()).decode()
        except InvalidToken:
            raise TokenDecryptionError("stored token cannot be decrypted with the configured keys") from None
