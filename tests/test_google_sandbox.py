"""The Google sandbox itself: deterministic data, OAuth token endpoint rules, env and certificate."""
from __future__ import annotations

import pytest

import base64
import datetime as dt
import hashlib
import re
import secrets
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests

from sandbox.common import ensure_certificate
from sandbox.google import GoogleSandboxData, parse_gaql

REDIRECT = "http://127.0.0.1:8765/cb"


def test_data_is_deterministic_and_realistic():
    a, b = GoogleSandboxData(seed=3, anchor=dt.date(2026, 6, 1)), GoogleSandboxData(seed=3, anchor=dt.date(2026, 6, 1))
    assert a.customers() == b.customers() and a.campaigns("2345678901") == b.campaigns("2345678901")
    assert GoogleSandboxData(seed=4, anchor=dt.date(2026, 6, 1)).campaigns("2345678901") != a.campaigns("2345678901")
    manager, *clients = a.customers()
    assert manager.manager and {c.currency for c in clients} == {"USD", "EUR"}
    for client in clients:
        campaigns = a.campaigns(client.id)
        assert len(campaigns) == 50 and len({c.id for c in campaigns}) == 50
        assert {c.status for c in campaigns} == {"ENABLED", "PAUSED", "REMOVED"}
        for c in campaigns:
            micros = c.budget_amount_micros or c.budget_total_micros
            assert micros > 0 and micros % 10_000 == 0
    start, end = dt.date(2026, 4, 1), dt.date(2026, 4, 30)
    rows = list(a.daily_metrics("3456789012", start, end))
    assert rows == list(b.daily_metrics("3456789012", start, end))
    for r in rows:
        assert 0 < r["impressions"] and 0 <= r["clicks"] <= r["impressions"]
        assert r["cost_micros"] % 10_000 == 0 and isinstance(r["conversions"], float)
        campaign = a.campaign(r["campaign_id"])
        assert campaign.start_date <= r["date"] and (campaign.last_active is None or r["date"] <= campaign.last_active)


def test_long_ranges_are_computed_on_the_fly_and_removed_campaigns_stop():
    data = GoogleSandboxData(seed=7, campaigns_per_client=200, include_jpy=True)
    today = dt.date.today()
    t0 = time.monotonic()
    count = 0
    removed = {c.id: c for c in data.campaigns("2345678901") if c.status == "REMOVED"}
    for row in data.daily_metrics("2345678901", today - dt.timedelta(days=900), today):
        count += 1
        if row["campaign_id"] in removed:
            assert row["date"] <= removed[row["campaign_id"]].last_active
    assert count > 10_000 and time.monotonic() - t0 < 10
    jpy = [r for r in data.daily_metrics("4567890123", today - dt.timedelta(days=30), today)]
    assert jpy and all(r["cost_micros"] % 1_000_000 == 0 for r in jpy)


def test_restatement_changes_recent_days_only():
    data = GoogleSandboxData(seed=7)
    today = dt.date.today()
    old = dt.date(2025, 1, 1)
    before_recent = list(data.daily_metrics("2345678901", today - dt.timedelta(days=2), today))
    before_old = list(data.daily_metrics("2345678901", old, old))
    data.restate(days=3)
    assert list(data.daily_metrics("2345678901", today - dt.timedelta(days=2), today)) != before_recent
    assert list(data.daily_metrics("2345678901", old, old)) == before_old


def test_gaql_parser():
    q = parse_gaql("SELECT campaign.id, metrics.clicks FROM campaign WHERE segments.date BETWEEN '2026-01-01' "
                   "AND '2026-01-31' AND campaign.status IN ('ENABLED', 'PAUSED') ORDER BY campaign.id DESC LIMIT 5")
    assert q.resource == "campaign" and q.fields == ["campaign.id", "metrics.clicks"] and q.limit == 5
    assert [(c.field, c.op) for c in q.conditions] == [("segments.date", "BETWEEN"), ("campaign.status", "IN")]
    assert q.order_by == [("campaign.id", True)]


def test_certificate_is_created_once_and_reused(tmp_path):
    cert, key = ensure_certificate(tmp_path)
    first = cert.read_bytes()
    assert ensure_certificate(tmp_path) == (cert, key) and cert.read_bytes() == first
    assert key.stat().st_mode & 0o777 == 0o600
    from cryptography import x509
    san = x509.load_pem_x509_certificate(first).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "localhost" in san.value.get_values_for_type(x509.DNSName)


# ---- OAuth server ------------------------------------------------------------------------------

def _code(env, base_url, challenge=None, access_type="offline", state="s1"):
    params = {"client_id": env["GOOGLE_CLIENT_ID"], "redirect_uri": REDIRECT, "response_type": "code",
              "scope": "https://www.googleapis.com/auth/adwords", "state": state, "access_type": access_type}
    if challenge:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    page = requests.get(env["GOOGLE_AUTHORIZE_URL"], params=params, timeout=5)
    consent_id = re.search(r'name="consent_id" value="([^"]+)"', page.text)[1]
    answer = requests.post(base_url + "/google/o/oauth2/v2/auth/consent",
                           data={"consent_id": consent_id, "decision": "allow"}, allow_redirects=False, timeout=5)
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    assert query["state"] == [state]
    return query["code"][0]


def test_token_endpoint_rules(sandbox):
    env, base = sandbox.env, sandbox.base_url
    client = (env["GOOGLE_CLIENT_ID"], env["GOOGLE_CLIENT_SECRET"])
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()

    # wrong PKCE verifier → invalid_grant; the code is then burnt
    code = _code(env, base, challenge)
    bad = requests.post(env["GOOGLE_TOKEN_URL"], auth=client, timeout=5, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": "x" * 43})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"

    # client_secret_basic with the right verifier
    code = _code(env, base, challenge)
    good = requests.post(env["GOOGLE_TOKEN_URL"], auth=client, timeout=5, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier})
    assert good.status_code == 200
    body = good.json()
    assert body["expires_in"] == 3600 and body["token_type"] == "Bearer" and body["refresh_token"]
    # replay → invalid_grant
    again = requests.post(env["GOOGLE_TOKEN_URL"], auth=client, timeout=5, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier})
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"

    # client_secret_post; online access → no refresh token
    code = _code(env, base, access_type="online")
    online = requests.post(env["GOOGLE_TOKEN_URL"], timeout=5, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
        "client_id": client[0], "client_secret": client[1]})
    assert online.status_code == 200 and "refresh_token" not in online.json()

    # refresh: new access token, no new refresh token; wrong secret → invalid_client; unknown → invalid_grant
    refreshed = requests.post(env["GOOGLE_TOKEN_URL"], auth=client, timeout=5,
                              data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert refreshed.status_code == 200 and "refresh_token" not in refreshed.json()
    assert refreshed.json()["access_token"] != body["access_token"]
    wrong = requests.post(env["GOOGLE_TOKEN_URL"], auth=(client[0], "nope"), timeout=5,
                          data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]})
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    unknown = requests.post(env["GOOGLE_TOKEN_URL"], auth=client, timeout=5,
                            data={"grant_type": "refresh_token", "refresh_token": "1//nope"})
    assert unknown.status_code == 400 and unknown.json() == {"error": "invalid_grant",
                                                             "error_description": "Token has been expired or revoked."}


def test_authorize_validation(sandbox):
    env = sandbox.env
    base = {"client_id": env["GOOGLE_CLIENT_ID"], "redirect_uri": REDIRECT, "response_type": "code",
            "scope": "https://www.googleapis.com/auth/adwords", "state": "abc"}
    assert requests.get(env["GOOGLE_AUTHORIZE_URL"], params=dict(base, client_id="other"), timeout=5).status_code == 401
    assert requests.get(env["GOOGLE_AUTHORIZE_URL"], params=dict(base, redirect_uri="https://evil.example/cb"),
                        timeout=5).status_code == 400
    answer = requests.get(env["GOOGLE_AUTHORIZE_URL"], params=dict(base, response_type="token"),
                          allow_redirects=False, timeout=5)
    assert answer.status_code == 302 and "error=unsupported_response_type" in answer.headers["Location"]
    page = requests.get(env["GOOGLE_AUTHORIZE_URL"], params=base, timeout=5)
    consent_id = re.search(r'name="consent_id" value="([^"]+)"', page.text)[1]
    denied = requests.post(sandbox.base_url + "/google/o/oauth2/v2/auth/consent",
                           data={"consent_id": consent_id, "decision": "deny"}, allow_redirects=False, timeout=5)
    assert parse_qs(urlsplit(denied.headers["Location"]).query) == {"error": ["access_denied"], "state": ["abc"]}


def test_env_and_env_file(sandbox, tmp_path):
    env = sandbox.env
    for key in ("GOOGLE_CLIENT_ID", "GOOGLE_CLIENT_SECRET", "GOOGLE_DEVELOPER_TOKEN", "GOOGLE_AUTHORIZE_URL",
                "GOOGLE_TOKEN_URL", "GOOGLE_ADS_ENDPOINT", "GOOGLE_ADS_CA_FILE"):
        assert env[key]
    assert re.fullmatch(r"localhost:\d+", env["GOOGLE_ADS_ENDPOINT"]) and Path(env["GOOGLE_ADS_CA_FILE"]).exists()
    path = sandbox.write_env_file(tmp_path / "sandbox.env")
    lines = dict(line.split("=", 1) for line in path.read_text().splitlines() if not line.startswith("#"))
    assert lines == env


def test_main_runs_in_the_foreground_and_stops_on_ctrl_c(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "sandbox.server", "--data-dir", str(tmp_path),
                             "--campaigns-per-client", "5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=Path(__file__).resolve().parent.parent, env=dict(os.environ))
    try:
        env_file = tmp_path / "sandbox.env"
        deadline = time.monotonic() + 30
        while not env_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        text = env_file.read_text()
        assert "GOOGLE_ADS_ENDPOINT=localhost:" in text and "GOOGLE_TOKEN_URL=http://127.0.0.1:" in text
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, output
        assert "Ctrl-C" in output
    finally:
        if proc.poll() is None:
            proc.kill()


def test_grants_survive_a_sandbox_restart(tmp_path):
    """The demo restarts the sandbox; connections made before must keep working."""
    from sandbox.server import SandboxServer

    with SandboxServer(tmp_path, seed=11) as first:
        oauth = first.platform("google").oauth
        grant_token = "1//persisted"
        from sandbox.google import _Grant
        with oauth._lock:
            oauth._grants[grant_token] = _Grant(grant_token, first.platform("google").client_id, "s")
        access = oauth._issue_access(first.platform("google").client_id, "s", oauth._grants[grant_token])
    with SandboxServer(tmp_path, seed=11) as second:
        oauth = second.platform("google").oauth
        assert oauth.check_access_token(access["access_token"]) == "ok"
        form = {"client_id": second.platform("google").client_id,
                "client_secret": second.platform("google").client_secret, "refresh_token": grant_token}
        assert oauth.refresh(form, None)["access_token"].startswith("ya29.")
        oauth.revoke(grant_token)
    with SandboxServer(tmp_path, seed=11) as third:
        oauth = third.platform("google").oauth
        assert oauth.check_access_token(access["access_token"]) in ("revoked", "invalid")
        with pytest.raises(Exception) as err:
            oauth.refresh(form, None)
        assert "invalid_grant" in str(err.value)
