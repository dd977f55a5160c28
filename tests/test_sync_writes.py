"""How a sync writes to the store: new rows inserted, changed rows updated, unchanged rows untouched,
rows a platform no longer reports removed, and a concurrent writer never turning into an error; days
whose digest is unchanged (``resources.sync_state``) are neither read nor written, and a sync that
fails half-way leaves the state invalid so the next one compares row by row.

``pipelines.sync.sync_connection`` runs here against the real store with an in-process connector
(no platform involved), so the store round-trips are what is tested.
"""
from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from pymongo import MongoClient, monitoring

from pipelines.sync import sync_connection
from resources.crypto import TokenCipher
from resources.platforms.base import Account, Connector, ConnectorSession, TransientPlatformError
from resources.repositories import CampaignRepository, UserRepository

TODAY = dt.datetime.now(dt.timezone.utc).date()


def _metric(campaign: int, day: dt.date, clicks: int = 3) -> dict:
    return {"account_id": "111", "campaign_id": str(campaign), "date": day.isoformat(), "impressions": 100,
            "clicks": clicks, "spend": Decimal("1.25"), "currency": "EUR", "conversions": Decimal(0)}


class _Session(ConnectorSession):
    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def fetch_daily_metrics(self, account, start, end):
        for row in self.rows:
            if start.isoformat() <= row["date"] <= end.isoformat():
                yield dict(row)

    def fetch_campaigns(self, account):
        for campaign in sorted({r["campaign_id"] for r in self.rows}):
            yield {"account_id": account.id, "campaign_id": campaign, "name": f"c{campaign}", "status": "ENABLED",
                   "currency": "EUR", "budget": Decimal("10")}


class _Connector(Connector):
    id = "google"  # writes to the google collections of this test's database
    display_name = "In-process"
    rows: list[dict] = []

    def __init__(self):
        super().__init__(settings=object())

    def open_session(self, token):
        return _Session(self.rows)


def _connected_user(db, settings):
    users = UserRepository(db)
    user = users.create("writes@example.com", "h")
    cipher = TokenCipher.from_settings(settings)
    account = Account(id="111", name="A", currency="EUR", time_zone="UTC")
    users.save_connection(user["_id"], "google", cipher.encrypt({"access_token": "x"}), scopes=[], expires_at=None,
                          accounts=[account.to_doc()])
    return user["_id"], cipher


class _Commands(monitoring.CommandListener):
    def __init__(self):
        self.names = []
        self.commands = []

    def started(self, event):
        self.names.append((event.command_name, event.command.get(event.command_name)))
        self.commands.append(event.command)

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass


def test_new_rows_are_inserted_and_a_concurrent_insert_becomes_an_update(db):
    user = UserRepository(db).create("u@example.com", "h")
    repo = CampaignRepository(db, "google")
    day = dt.date(2026, 3, 1)
    first = repo.upsert_metrics(user["_id"], [_metric(1, day), _metric(2, day)], known={})
    assert (first.inserted, first.updated, first.unchanged) == (2, 0, 0)
    # "known" says nothing is stored (another writer stored campaign 1 meanwhile): no error, it is updated
    again = repo.upsert_metrics(user["_id"], [_metric(1, day, clicks=9), _metric(3, day)], known={})
    assert (again.inserted, again.updated, again.unchanged) == (1, 1, 0)
    assert db.google_campaign_metrics.find_one({"campaign_id": "1"})["clicks"] == 9
    assert db.google_campaign_metrics.count_documents({}) == 3
    known = repo.metric_hashes(user["_id"], "111", "2026-03-01", "2026-03-01")
    assert len(known) == 3 and all(known.values())
    same = repo.upsert_metrics(user["_id"], [_metric(1, day, clicks=9), _metric(2, day), _metric(3, day)], known=known)
    assert (same.inserted, same.updated, same.unchanged) == (0, 0, 3)
    assert repo.delete_metrics([(user["_id"], "111", "2", "2026-03-01")]) == 1
    assert db.google_campaign_metrics.count_documents({}) == 2


def test_resync_skips_unchanged_days_reads_only_changed_days_and_removes_unreported_rows(db, settings, store_uri):
    user_id, cipher = _connected_user(db, settings)
    days = [TODAY - dt.timedelta(days=n) for n in range(10)]
    _Connector.rows = [_metric(c, d) for c in (1, 2, 3) for d in days]
    first = sync_connection(db, cipher, _Connector(), user_id, history_days=10, lookback_days=5, batch_size=7)
    assert first.first_sync and first.metrics.inserted == 30 and first.metric_rows_deleted == 0
    UserRepository(db).record_sync(user_id, "google", status="success", success=True)
    state = db.sync_state.find_one({"user_id": user_id, "platform": "google", "account_id": "111"})
    assert "pending" not in state and len(state["days"]) == 10 and state["days"][TODAY.isoformat()].startswith("3:")

    listener = _Commands()
    monitored = MongoClient(store_uri, event_listeners=[listener], tz_aware=True)
    try:
        mdb = monitored[db.name]
        before = {d["_id"]: d["last_synced"] for d in db.google_campaign_metrics.find()}
        second = sync_connection(mdb, cipher, _Connector(), user_id, history_days=10, lookback_days=5, batch_size=7)
        assert not second.first_sync and second.metrics.unchanged == 15 and second.rows()["written"] == 0
        assert {d["_id"]: d["last_synced"] for d in db.google_campaign_metrics.find()} == before
        # every day's digest matched: the metric rows were neither read nor summed again
        assert not [c for c in listener.names if c[1] == "google_campaign_metrics"]
        assert not [c for c in listener.names if c[0] in ("insert", "update", "delete")]  # nothing written

        # campaign 2 no longer reports two recent days (a restatement reversed them): they are removed
        gone = {days[1].isoformat(), days[3].isoformat()}
        _Connector.rows = [r for r in _Connector.rows if not (r["campaign_id"] == "2" and r["date"] in gone)]
        listener.commands.clear()
        third = sync_connection(mdb, cipher, _Connector(), user_id, history_days=10, lookback_days=5, batch_size=7)
    finally:
        monitored.close()
    assert third.metric_rows_deleted == 2 and third.metrics.written == 0 and third.metrics.unchanged == 13
    metric_finds = [c for c in listener.commands if c.get("find") == "google_campaign_metrics"]
    assert [sorted(c["filter"]["date"]["$in"]) for c in metric_finds] == [sorted(gone)]  # only the changed days
    assert db.google_campaign_metrics.count_documents({"campaign_id": "2"}) == 8
    campaign = db.google_campaigns.find_one({"campaign_id": "2"})  # totals follow the removal
    assert campaign["clicks"] == 8 * 3 and campaign["spend"].to_decimal() == Decimal("10")
    state = db.sync_state.find_one({"user_id": user_id, "platform": "google", "account_id": "111"})
    assert "pending" not in state and state["days"][days[1].isoformat()].startswith("2:")


class _FailingCampaigns(_Session):
    def fetch_campaigns(self, account):
        raise TransientPlatformError("campaign listing failed")


class _FailingConnector(_Connector):
    def open_session(self, token):
        return _FailingCampaigns(self.rows)


def _stored(db) -> dict:
    return {(d["campaign_id"], d["date"]): d["clicks"] for d in db.google_campaign_metrics.find()}


def test_a_sync_failing_after_its_writes_leaves_the_state_invalid_and_the_next_compares_row_by_row(db, settings):
    user_id, cipher = _connected_user(db, settings)
    days = [TODAY - dt.timedelta(days=n) for n in range(4)]
    original = [_metric(c, d) for c in (1, 2) for d in days]
    _Connector.rows = original
    sync_connection(db, cipher, _Connector(), user_id, history_days=4, lookback_days=4)
    UserRepository(db).record_sync(user_id, "google", status="success", success=True)

    # the platform restates a day; the sync writes it, then fails before the campaign totals
    _Connector.rows = [dict(r, clicks=7) if r["date"] == days[0].isoformat() else r for r in original]
    with pytest.raises(TransientPlatformError):
        sync_connection(db, cipher, _FailingConnector(), user_id, history_days=4, lookback_days=4)
    assert _stored(db)[("1", days[0].isoformat())] == 7
    assert db.sync_state.find_one({"user_id": user_id})["pending"]

    # the platform reverts the restatement: the old digests match it again, but they no longer
    # describe the store, so the rows are compared one by one and put back
    _Connector.rows = original
    again = sync_connection(db, cipher, _Connector(), user_id, history_days=4, lookback_days=4)
    assert again.metrics.updated == 2 and set(_stored(db).values()) == {3}
    assert db.google_campaigns.find_one({"campaign_id": "1"})["clicks"] == 4 * 3
    assert "pending" not in db.sync_state.find_one({"user_id": user_id})


def test_a_window_longer_than_the_digest_buffer_streams_against_the_stored_rows(db, settings, monkeypatch):
    import pipelines.sync

    user_id, cipher = _connected_user(db, settings)
    days = [TODAY - dt.timedelta(days=n) for n in range(6)]
    _Connector.rows = [_metric(c, d) for c in (1, 2, 3) for d in days]
    sync_connection(db, cipher, _Connector(), user_id, history_days=6, lookback_days=6, batch_size=4)
    UserRepository(db).record_sync(user_id, "google", status="success", success=True)
    monkeypatch.setattr(pipelines.sync, "DIGEST_BUFFER_ROWS", 5)
    _Connector.rows = [dict(r, clicks=9) if (r["campaign_id"], r["date"]) == ("3", days[5].isoformat()) else r
                       for r in _Connector.rows]
    outcome = sync_connection(db, cipher, _Connector(), user_id, history_days=6, lookback_days=6, batch_size=4)
    assert (outcome.metrics.updated, outcome.metrics.unchanged, outcome.metric_rows_deleted) == (1, 17, 0)
    assert _stored(db)[("3", days[5].isoformat())] == 9
    # the digests saved by the streamed sync are complete: an unchanged re-sync (buffer back to
    # normal) skips every day
    monkeypatch.setattr(pipelines.sync, "DIGEST_BUFFER_ROWS", 25_000)
    assert "pending" not in db.sync_state.find_one({"user_id": user_id})
    same = sync_connection(db, cipher, _Connector(), user_id, history_days=6, lookback_days=6)
    assert same.metrics.unchanged == 18 and same.rows()["written"] == 0


def test_deleting_a_users_rows_forgets_their_sync_state(db, settings):
    user_id, cipher = _connected_user(db, settings)
    _Connector.rows = [_metric(1, TODAY)]
    sync_connection(db, cipher, _Connector(), user_id, history_days=2, lookback_days=2)
    assert db.sync_state.count_documents({"user_id": user_id}) == 1
    assert CampaignRepository(db, "google").delete_user(user_id) == 2
    assert db.sync_state.count_documents({"user_id": user_id}) == 0


def test_checks_find_orphan_campaigns_and_negative_rows_in_one_pass(db):
    from bson import Decimal128, ObjectId

    from pipelines.assets import _checks

    user, other = ObjectId(), ObjectId()
    db.google_campaigns.insert_one({"user_id": user, "account_id": "1", "campaign_id": "a"})
    db.google_campaign_metrics.insert_many([
        {"user_id": user, "account_id": "1", "campaign_id": "a", "date": "2026-01-01", "impressions": 5, "clicks": 1,
         "spend": Decimal128("1.5")},
        {"user_id": user, "account_id": "1", "campaign_id": "a", "date": "2026-01-02", "impressions": 5, "clicks": -1,
         "spend": Decimal128("1.5")},
        {"user_id": user, "account_id": "1", "campaign_id": "b", "date": "2026-01-01", "impressions": 5, "clicks": 1,
         "spend": Decimal128("-0.5")},
        {"user_id": other, "account_id": "1", "campaign_id": "z", "date": "2026-01-01", "impressions": -5, "clicks": 1,
         "spend": Decimal128("1")}])
    results = {c.check_name: c for c in _checks(db, "google", user)}
    assert not results["metrics_reference_campaigns"].passed
    assert results["metrics_reference_campaigns"].metadata["orphan_campaigns"].value == 1
    assert not results["metrics_non_negative"].passed
    assert results["metrics_non_negative"].metadata["negative_rows"].value == 2
    clean = {c.check_name: c.passed for c in _checks(db, "google", other)}
    assert clean == {"metrics_reference_campaigns": False, "metrics_non_negative": False}
    # shops have no spend per day: a missing field is not negative
    shop = ObjectId()
    db.google_campaigns.insert_one({"user_id": shop, "account_id": "s", "campaign_id": "u"})
    db.google_campaign_metrics.insert_one({"user_id": shop, "account_id": "s", "campaign_id": "u",
                                           "date": "2026-01-01", "orders": 3})
    assert {c.check_name: c.passed for c in _checks(db, "google", shop)} == {
        "metrics_reference_campaigns": True, "metrics_non_negative": True}
