"""The store (real MongoDB-wire server through pymongo), indexes, the token cipher and repositories."""
from __future__ import annotations

import datetime as dt
import os
import stat
from decimal import Decimal

import pytest
from bson import Decimal128
from pymongo.errors import DuplicateKeyError

from resources.crypto import TokenCipher, TokenDecryptionError
from resources.repositories import (CONNECTED, NEEDS_REAUTH, CampaignRepository, DuplicateEmail,
                                    UserRepository)
from resources.settings import ConfigurationError, Settings
from resources.store.embedded import ensure_jars


def test_indexes_are_unique_on_natural_keys(db):
    users = UserRepository(db)
    users.create("Someone@Example.com ", "hash")
    with pytest.raises(DuplicateEmail):
        users.create("someone@example.com", "hash2")
    assert db.users.count_documents({}) == 1
    assert db.users.find_one()["email"] == "someone@example.com"
    db.google_campaign_metrics.insert_one({"user_id": 1, "account_id": "a", "campaign_id": "c", "date": "2026-01-01"})
    with pytest.raises(DuplicateKeyError):
        db.google_campaign_metrics.insert_one({"user_id": 1, "account_id": "a", "campaign_id": "c", "date": "2026-01-01"})


def _metric(campaign: int, day: int, spend: str = "1.25") -> dict:
    return {"account_id": "111", "campaign_id": str(campaign), "date": f"2026-03-{day:02d}",
            "impressions": 100 * campaign + day, "clicks": campaign + day, "spend": Decimal(spend),
            "currency": "EUR"}


def test_bulk_upsert_is_idempotent_and_restatements_overwrite(db):
    user = UserRepository(db).create("u@example.com", "h")
    repo = CampaignRepository(db, "google")
    docs = [_metric(c, d) for c in range(1, 21) for d in range(1, 11)]
    first = repo.upsert_metrics(user["_id"], docs)
    assert (first.inserted, first.updated, first.unchanged) == (200, 0, 0)
    before = {d["_id"]: d["last_synced"] for d in db.google_campaign_metrics.find()}
    second = repo.upsert_metrics(user["_id"], docs)
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 200)
    assert {d["_id"]: d["last_synced"] for d in db.google_campaign_metrics.find()} == before
    docs[5] = _metric(1, 6, spend="9.99")  # a restated day
    third = repo.upsert_metrics(user["_id"], docs)
    assert (third.inserted, third.updated, third.unchanged) == (0, 1, 199)
    row = db.google_campaign_metrics.find_one({"campaign_id": "1", "date": "2026-03-06"})
    assert row["spend"] == Decimal128("9.99")
    total = next(db.google_campaign_metrics.aggregate([{"$group": {"_id": None, "s": {"$sum": "$spend"}}}]))["s"]
    assert total.to_decimal() == Decimal("1.25") * 199 + Decimal("9.99")


def test_connection_lifecycle(db):
    users = UserRepository(db)
    user = users.create("c@example.com", "h")
    connected_at = users.save_connection(user["_id"], "google", "ciphertext", scopes=["s"], expires_at=None,
                                         accounts=[{"id": "1"}])
    assert users.connection(user["_id"], "google")["status"] == CONNECTED
    users.mark_needs_reauth(user["_id"], "google", "invalid_grant")
    assert users.connection(user["_id"], "google")["status"] == NEEDS_REAUTH
    assert users.update_token(user["_id"], "google", "new", None) is True
    assert users.connection(user["_id"], "google")["status"] == CONNECTED
    assert users.connection(user["_id"], "google")["connected_at"] == connected_at
    assert users.clear_connection(user["_id"], "google") is True
    assert users.connection(user["_id"], "google") is None
    assert users.update_token(user["_id"], "google", "late", None) is False  # no resurrection
    assert users.connection(user["_id"], "google") is None


def test_token_cipher_rotation_and_key_file(tmp_path):
    old, new = TokenCipher.generate_key(), TokenCipher.generate_key()
    token = {"access_token": "ya29.secret", "refresh_token": "1//r", "expires_at": 1_800_000_000}
    ciphertext = TokenCipher([old]).encrypt(token)
    assert "ya29" not in ciphertext
    both = TokenCipher([new, old])
    assert both.decrypt(ciphertext) == token
    rotated = both.rotate(ciphertext)
    assert TokenCipher([new]).decrypt(rotated) == token
    with pytest.raises(TokenDecryptionError) as err:
        TokenCipher([new]).decrypt(ciphertext)
    assert "ya29" not in str(err.value)
    with pytest.raises(ValueError):
        TokenCipher(["not-a-key"])
    settings = Settings(data_dir=tmp_path, token_encryption_keys="")
    cipher = TokenCipher.from_settings(settings)
    key_file = tmp_path / "token.keys"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert TokenCipher.from_settings(settings).decrypt(cipher.encrypt(token)) == token


def test_missing_store_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("MONGODB_URI", raising=False)
    with pytest.raises(ConfigurationError) as err:
        Settings(data_dir=tmp_path, mongodb_uri="").resolved_mongodb_uri()
    assert "MONGODB_URI" in str(err.value) and "make store" in str(err.value)
    monkeypatch.setenv("PATH", str(tmp_path))  # no java, no mvn
    with pytest.raises(ConfigurationError) as err:
        ensure_jars(tmp_path / "jars")
    assert "Java" in str(err.value) and "MONGODB_URI" in str(err.value)


def test_embedded_store_persists_and_leaves_no_process(tmp_path):
    if os.environ.get("UA_EXTERNAL_STORE_ONLY"):
        pytest.skip("embedded store not used")
    from pymongo import MongoClient

    from resources.settings import PROJECT_ROOT
    from resources.store.embedded import EmbeddedStore

    jars = ensure_jars(PROJECT_ROOT / "data" / "store" / "jars")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "jars").symlink_to(jars)
    db_file = tmp_path / "persist.mv"
    store = EmbeddedStore(tmp_path, db_file=db_file)
    uri = store.start()
    proc = store.process
    with MongoClient(uri) as client:
        client.app.things.insert_many([{"n": i} for i in range(10)])
    store.stop()
    assert proc.poll() is not None, "the Java process must be gone after stop()"
    with EmbeddedStore(tmp_path, db_file=db_file, cache_mb=64) as again, MongoClient(again.uri) as client:
        assert client.app.things.count_documents({}) == 10
    # the page cache the store was asked for (EMBEDDED_STORE_CACHE_MB) is the one it opened the file with
    log = (tmp_path / "store" / "server.log").read_text()
    assert "page cache 512 MB" in log and log.rstrip().count("page cache 64 MB") == 1


def test_money_display_follows_the_currency_minor_units():
    from resources.money import format_amount

    assert format_amount(Decimal("46200"), "JPY") == "46,200"
    assert format_amount(Decimal("1234.5"), "USD") == "1,234.50"
    assert format_amount(Decimal("1.2345"), "KWD") == "1.2345"  # real extra precision is kept
    assert format_amount(Decimal("7"), "KWD") == "7.000"
    assert format_amount(None, "EUR") == "—"
