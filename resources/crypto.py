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

from resources.settings import ConfigurationError, Settings, read_or_create_secret_file


class TokenDecryptionError(RuntimeError):
    """A stored token could not be decrypted with any configured key (wrong or removed key)."""


class KeyConfigurationError(ConfigurationError, ValueError):
    """The configured token keys cannot be used: none, or one that is not a Fernet key, or an
    unreadable key file. The message names where the key came from (``TOKEN_ENCRYPTION_KEYS`` entry,
    or key file and line) and never contains the key itself."""


#: how to make a valid key, quoted in error messages
KEY_HINT = ("a Fernet key is 44 characters of URL-safe base64; make one with "
            "`python -c \"from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())\"`")

ENV_VAR = "TOKEN_ENCRYPTION_KEYS"


class TokenCipher:
    """Encrypts and decrypts OAuth token dicts.

    Args:
        keys: Fernet keys (urlsafe base64, 32 bytes), newest first. At least one. Blank entries are
            skipped.
        labels: where each key came from, parallel to ``keys`` (e.g. ``"line 2 of data/token.keys"``),
            used in error messages; default ``"TOKEN_ENCRYPTION_KEYS entry #<n>"``.
        origin: what holds the keys, for the "holds no key" message.

    Raises:
        KeyConfigurationError (a ``ValueError`` and a ``ConfigurationError``): no key, or a key that is
            not a valid Fernet key (the message names its source, never the key).
    """

    def __init__(self, keys: list[str], labels: list[str] | None = None, origin: str = ENV_VAR):
        if labels is None:
            labels = [f"{ENV_VAR} entry #{index + 1}" for index in range(len(keys))]
        entries = [(key.strip(), label) for key, label in zip(keys, labels) if key and key.strip()]
        if not entries:
            raise KeyConfigurationError(f"{origin} holds no key; {KEY_HINT}")
        fernets = []
        for key, label in entries:
            try:
                fernets.append(Fernet(key.encode()))
            except (ValueError, TypeError):
                raise KeyConfigurationError(f"{label} is not a valid Fernet key ({KEY_HINT})") from None
        self._fernet = MultiFernet(fernets)

    @classmethod
    def from_settings(cls, settings: Settings) -> "TokenCipher":
        """Keys from ``TOKEN_ENCRYPTION_KEYS`` (comma-separated), else ``<data_dir>/token.keys`` (one
        key per line, newest first; generated once with mode 0600).

        Raises:
            KeyConfigurationError: a key is not valid (named by env-var entry or by file and line), no
                key is configured, or the key file cannot be read.
        """
        raw = settings.token_encryption_keys
        if raw:
            entries = [entry for entry in raw.split(",") if entry.strip()]
            return cls(entries, [f"{ENV_VAR} entry #{index + 1}" for index in range(len(entries))],
                       origin=ENV_VAR)
        path = settings.data_dir / "token.keys"
        try:
            if not path.exists():
                read_or_create_secret_file(path, cls.generate_key)
            text = path.read_bytes().decode("utf-8", errors="replace")
        except OSError as exc:
            raise KeyConfigurationError(
                f"the key file {path} cannot be read ({exc.strerror or type(exc).__name__}); "
                f"fix its permissions or set {ENV_VAR}") from None
        keys: list[str] = []
        labels: list[str] = []
        for number, line in enumerate(text.splitlines(), start=1):
            for entry in line.split(","):  # one key per line; a comma-separated line is tolerated
                if entry.strip():
                    keys.append(entry)
                    labels.append(f"line {number} of the key file {path}")
        return cls(keys, labels, origin=f"the key file {path}")

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
