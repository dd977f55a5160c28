"""Keep secrets out of logs: a logging filter that masks OAuth parameters in logged URLs.

Request loggers (werkzeug's access log, the sandbox's request log) print full URLs; OAuth callbacks
carry ``code`` and ``state`` (and Shopify's ``hmac``), and token endpoints may see ``access_token``,
``refresh_token``, ``client_secret``, ``fb_exchange_token`` or ``appsecret_proof``. ``install()`` adds a
filter to the given loggers that replaces those values with ``***``.
"""
from __future__ import annotations

import logging
import re

SENSITIVE_PARAMS = ("code", "state", "hmac", "access_token", "refresh_token", "client_secret",
                    "fb_exchange_token", "appsecret_proof", "password", "input_token")
_PATTERN = re.compile(r"(?i)([?&](?:%s)=)[^&\s\"']+" % "|".join(SENSITIVE_PARAMS))
#: document fields masked in logged JSON (pymongo's DEBUG command log prints whole documents)
SENSITIVE_FIELDS = ("password_hash", "token", "access_token", "refresh_token", "client_secret")
_FIELD_PATTERN = re.compile(r'(\\?"(?:[\w.]*\.)?(?:%s)\\?"\s*:\s*\\?")[^"\\]+' % "|".join(SENSITIVE_FIELDS))


def redact(text: str) -> str:
    """``text`` with the values of sensitive query parameters and JSON fields replaced by ``***``."""
    return _FIELD_PATTERN.sub(r"\1***", _PATTERN.sub(r"\1***", text))


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (after %-formatting) with ``redact``."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error handling
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def install(*logger_names: str) -> None:
    """Attach one ``RedactingFilter`` to each named logger (idempotent)."""
    for name in logger_names or ("werkzeug",):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
