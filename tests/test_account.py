"""Account lifecycle over real HTTP: change password, per-session logout, delete the account (every
document with the user's id, in every platform collection and ``sync_requests``), and the Dagster
partitions disappearing through the connections sensor — the portal never calls Dagster.
"""
from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
import requests

from test_portal import PASSWORD, _portal, connect_fake, google_consent, google_only, portal  # noqa: F401
from resources.platforms import registry
from resources.repositories import CampaignRepository, UserRepository
from resources.store import campaigns_collection, metrics_collection

NEW_PASSWORD = "a brand new passphrase 7"


def logged_in(client) -> bool:
    return client.get("/dashboard", allow_redirects=False).status_code == 200


def test_change_password_rehashes_and_ends_other_sessions(portal, db):
    portal.signup("ann@example.com")
    other = portal.new_browser()
    other.login("ann@example.com")
    assert logged_in(other)
    old_hash = db.users.find_one({})["password_hash"]

    wrong = portal.submit("/account", "/account/password", {"current_password": "not my password!",
                                                           "new_password": NEW_PASSWORD,
                                                           "new_password_confirm": NEW_PASSWORD})
    assert wrong.status_code == 400 and "current password is not correct" in wrong.text
    weak = portal.submit("/account", "/account/password", {"current_password": PASSWORD,
                                                          "new_password": "password123",
                                                          "new_password_confirm": "password123"})
    assert weak.status_code == 400 and "too common" in weak.text
    mismatch = portal.submit("/account", "/account/password", {"current_password": PASSWORD,
                                                              "new_password": NEW_PASSWORD,
                                                              "new_password_confirm": NEW_PASSWORD + "x"})
    assert mismatch.status_code == 400 and "do not match" in mismatch.text
    assert db.users.find_one({})["password_hash"] == old_hash and logged_in(other)

    done = portal.submit("/account", "/account/password", {"current_password": PASSWORD,
                                                          "new_password": NEW_PASSWORD,
                                                          "new_password_confirm": NEW_PASSWORD})
    assert done.status_code == 200 and "password was changed" in done.text
    new_hash = db.users.find_one({})["password_hash"]
    assert new_hash != old_hash and new_hash.startswith("$2") and NEW_PASSWORD not in new_hash
    assert logged_in(portal)  # this browser got a renewed session
    assert not logged_in(other)  # every other one ended
    third = portal.new_browser()
    assert third.login("ann@example.com", PASSWORD).status_code == 401
    assert third.login("ann@example.com", NEW_PASSWORD).status_code == 200 and logged_in(third)


def test_logout_ends_the_session_on_the_server(portal, db):
    """A copy of the session cookie taken before logging out does not work afterwards."""
    portal.signup("ann@example.com")
    stolen = portal.new_browser()
    stolen.http.cookies.update(portal.http.cookies)
    assert logged_in(stolen)
    portal.logout()
    assert not logged_in(stolen) and not logged_in(portal)
    assert db.users.find_one({})["sessions"] == []
    portal.login("ann@example.com")
    assert logged_in(portal) and len(db.users.find_one({})["sessions"]) == 1


def _seed_everywhere(db, user_id, platform_ids) -> int:
    """One campaign, one metric row per platform collection, and a sync request; returns documents added."""
    for pid in platform_ids:
        repo = CampaignRepository(db, pid)
        repo.upsert_campaigns(user_id, [{"account_id": "1", "campaign_id": "c1", "name": "C", "status": "ENABLED",
                                         "currency": "EUR", "budget": Decimal("1")}])
        repo.upsert_metrics(user_id, [{"account_id": "1", "campaign_id": "c1", "date": "2026-01-01",
                                       "impressions": 1, "clicks": 1, "spend": Decimal("1"), "currency": "EUR"}])
    db.sync_requests.insert_one({"user_id": user_id, "platform": platform_ids[0], "status": "success",
                                 "requested_at": dt.datetime.now(dt.timezone.utc)})
    db.audit_notes.insert_one({"user_id": user_id, "note": "any other collection holding the user id"})
    return 2 * len(platform_ids) + 2


def _user_documents(db, user_id) -> dict[str, int]:
    found = {name: db[name].count_documents({"user_id": user_id}) for name in db.list_collection_names()}
    found["users"] = db.users.count_documents({"_id": user_id})
    return {k: v for k, v in found.items() if v}


def test_delete_account_removes_every_document_of_the_user(portal, db):
    platform_ids = list(registry.PLATFORMS)
    portal.signup("ann@example.com")
    connect_fake(portal)
    user_id = db.users.find_one({"email": "ann@example.com"})["_id"]
    _seed_everywhere(db, user_id, platform_ids)
    bob = UserRepository(db).create("bob@example.com", "x")
    bob_docs = _seed_everywhere(db, bob["_id"], platform_ids)
    other = portal.new_browser()
    other.login("ann@example.com")

    page = portal.get("/account")
    assert page.status_code == 200 and "Delete my account" in page.text and "Fake Ads" in page.text
    refused = portal.submit("/account", "/account/delete", {"password": "not my password!"})
    assert refused.status_code == 400 and "nothing was deleted" in refused.text
    assert _user_documents(db, user_id)["users"] == 1 and logged_in(portal)

    done = portal.submit("/account", "/account/delete", {"password": PASSWORD})
    assert done.status_code == 200 and done.url.endswith("/signup") and "account was deleted" in done.text
    assert _user_documents(db, user_id) == {}  # user, token, campaigns, metrics, sync requests, everything
    assert sum(_user_documents(db, bob["_id"]).values()) == bob_docs + 1  # + bob's users document
    assert not logged_in(portal) and not logged_in(other)
    assert portal.login("ann@example.com").status_code == 401


@google_only
def test_deleted_account_loses_its_dagster_partitions(sandbox, db, monkeypatch, settings):
    """Connect Google through the sandbox, let the sensor add the partition, delete the account in the
    portal, tick the sensor again: the partition is gone (the portal itself never calls Dagster)."""
    from dagster import instance_for_test

    from pipelines.definitions import build_definitions
    from resources.store.resource import MongoStoreResource
    from test_pipelines import tick

    client, stop = _portal(db, monkeypatch, None)
    try:
        client.signup("gone@example.com")
        callback = google_consent(client)
        assert client.http.get(callback).status_code == 200
        keeper = client.new_browser()
        keeper.signup("keeper@example.com")
        assert keeper.http.get(google_consent(keeper)).status_code == 200
        users = {u["email"]: str(u["_id"]) for u in db.users.find({}, {"email": 1})}

        defs, _platforms = build_definitions(MongoStoreResource(database=settings.mongodb_db))
        with instance_for_test() as instance:
            tick(defs, instance, "google_connections_sensor")
            assert sorted(instance.get_dynamic_partitions("google_connections")) == sorted(users.values())
            _seed_everywhere(db, db.users.find_one({"email": "gone@example.com"})["_id"], list(registry.PLATFORMS))

            response = client.submit("/account", "/account/delete", {"password": PASSWORD})
            assert response.status_code == 200 and "account was deleted" in response.text
            gone = db.users.find_one({"email": "gone@example.com"})
            assert gone is None
            for pid in registry.PLATFORMS:
                for name in (campaigns_collection(pid), metrics_collection(pid)):
                    assert db[name].count_documents({}) == 0, name
            assert db.sync_requests.count_documents({}) == 0

            result = tick(defs, instance, "google_connections_sensor")
            assert instance.get_dynamic_partitions("google_connections") == [users["keeper@example.com"]]
            assert not result.run_requests
    finally:
        stop()
