"""Secrets never reach the logs: OAuth parameters in logged URLs are masked."""
import logging

from resources import redaction


def test_redacting_filter_masks_oauth_parameters(caplog):
    redaction.install("ua.test.access")
    logger = logging.getLogger("ua.test.access")
    with caplog.at_level(logging.INFO, logger="ua.test.access"):
        logger.info('"GET %s HTTP/1.1" 302', "/connections/google/callback?code=4/SECRETCODE&scope=x&state=STATE123")
        logger.info("POST /token?client_secret=sssh&grant_type=refresh_token&refresh_token=1//REFRESH")
    text = caplog.text
    assert "SECRETCODE" not in text and "STATE123" not in text and "sssh" not in text and "REFRESH" not in text
    assert "code=***" in text and "scope=x" in text and "grant_type=refresh_token" in text


def test_document_fields_are_masked_in_logged_json():
    line = ('{"command": "{\\"insert\\": \\"users\\", \\"documents\\": [{\\"email\\": \\"a@b.c\\", '
            '\\"password_hash\\": \\"$2b$12$SECRETHASH\\", \\"oauth\\": {\\"google\\": '
            '{\\"token\\": \\"gAAAAFERNET\\"}}}]}"}')
    cleaned = redaction.redact(line)
    assert "SECRETHASH" not in cleaned and "gAAAAFERNET" not in cleaned
    assert "a@b.c" in cleaned and "password_hash" in cleaned
    dotted = redaction.redact('{\\"$set\\": {\\"oauth.google.token\\": \\"gAAAAROTATED\\"}}')
    assert "gAAAAROTATED" not in dotted
