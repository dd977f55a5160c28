"""Hardening checks that are generic over the app: every state-changing route needs the CSRF token,
sign-ups are rate-limited, operator objects in JSON/form/query input are refused with no write, emails
are normalised, and no page (or JSON answer) ever shows a token. The other hardening points (cookie
flags, ``next``, login rate limit, session renewal, headers, password rules) are in test_portal.py.
"""
from __future__ import annotations

import json
import re

import pytest

from test_portal import PASSWORD, connect_fake, make_portal, portal  # noqa: F401 — fixtures
from resources.crypto import TokenCipher
from resources.repositories import normalize_email

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def snapshot(db) -> str:
    """Everything in the database except volatile login bookkeeping, as comparable text."""
    out = {}
    for name in sorted(db.list_collection_names()):
        docs = list(db[name].find({}, {"sessions": 0}).sort("_id", 1))
        out[name] = docs
    return json.dumps(out, default=str, sort_keys=True)


def state_changing_rules(app):
    for rule in app.url_map.iter_rules():
        methods = (rule.methods or set()) & STATE_CHANGING
        if methods and rule.endpoint != "static":
            yield rule, sorted(methods)


def test_every_state_changing_route_requires_the_csrf_token(portal, db):
    portal.signup("ann@example.com")
    connect_fake(portal)
    from oauth_portal.extensions import csrf

    assert not getattr(csrf, "_exempt_views", set()), "a view is exempt from CSRF; give it its own check and list it here"
    before = snapshot(db)
    checked = set()
    for rule, methods in state_changing_rules(portal.app):
        path = rule.rule
        for argument in rule.arguments:
            path = path.replace(f"<{argument}>", "fake").replace(f"<string:{argument}>", "fake")
        for method in methods:
            for data in ({}, {"csrf_token": "forged"}, {"csrf_token": "", "purge": "1", "password": PASSWORD}):
                response = portal.http.request(method, portal.abs(path), data=data, allow_redirects=False)
                assert response.status_code == 400, (method, path, data, response.status_code)
                assert "Traceback" not in response.text
            checked.add(rule.endpoint)
    assert {"auth.signup", "auth.login", "auth.logout", "auth.logout_everywhere", "auth.change_password",
            "auth.delete_account", "connections.connect", "connections.disconnect",
            "dashboard.sync_now"} <= checked
    assert snapshot(db) == before  # nothing written, nothing deleted
    assert portal.get("/dashboard", allow_redirects=False).status_code == 200  # still logged in


def test_signup_rate_limited(make_portal, db):
    portal = make_portal({"SIGNUP_RATE_LIMIT": "5 per minute"})
    statuses = [portal.signup(f"user{i}@example.com", "short").status_code for i in range(5)]
    assert statuses == [400] * 5
    response = portal.signup("late@example.com")
    assert response.status_code == 429 and "Too many attempts" in response.text
    assert db.users.count_documents({}) == 0


def _csrf(portal, page="/login", action="/login") -> str:
    return portal.csrf_from(page, action)


@pytest.mark.parametrize("body", [
    {"email": {"$ne": None}, "password": {"$ne": None}},
    {"email": "ann@example.com", "password": {"$gt": ""}},
    {"email": ["ann@example.com"], "password": PASSWORD},
    {"$where": "1 == 1", "email": "ann@example.com", "password": PASSWORD},
    [{"email": "ann@example.com"}],
])
def test_operator_objects_in_json_refused(portal, db, body):
    portal.signup("ann@example.com")
    portal.logout()
    token = _csrf(portal)
    before = snapshot(db)
    response = portal.http.post(portal.abs("/login"), data=json.dumps(body),
                                headers={"Content-Type": "application/json", "X-CSRFToken": token},
                                allow_redirects=False)
    assert response.status_code == 400, response.text
    assert "plain" in response.text and "Traceback" not in response.text
    assert portal.get("/dashboard", allow_redirects=False).status_code == 302  # not logged in
    signup = portal.http.post(portal.abs("/signup"), data=json.dumps(body),
                              headers={"Content-Type": "application/json", "X-CSRFToken": _csrf(portal, "/signup", "/signup")},
                              allow_redirects=False)
    assert signup.status_code == 400
    assert snapshot(db) == before


def test_plain_json_still_works(portal, db):
    """The guard refuses operators, not JSON: a flat JSON login with the CSRF header logs in."""
    portal.signup("ann@example.com")
    portal.logout()
    response = portal.http.post(portal.abs("/login"), json={"email": "ann@example.com", "password": PASSWORD},
                                headers={"X-CSRFToken": _csrf(portal)}, allow_redirects=False)
    assert response.status_code == 302 and response.headers["Location"].endswith("/dashboard")


def test_operator_keys_in_forms_and_queries_refused(portal, db):
    portal.signup("ann@example.com")
    connect_fake(portal)
    token = portal.csrf_from("/connections", "/connections/fake/disconnect")
    before = snapshot(db)
    for data in ({"csrf_token": token, "purge[$ne]": "0"}, {"csrf_token": token, "$set": "x"},
                 {"csrf_token": token, "purge": "1", "oauth[fake]": "x"}):
        response = portal.post("/connections/fake/disconnect", data)
        assert response.status_code == 400 and "plain text values" in response.text
    response = portal.http.post(portal.abs("/connections/fake/disconnect"), json={"purge": {"$ne": "0"}},
                                headers={"X-CSRFToken": token})
    assert response.status_code == 400
    assert snapshot(db) == before  # still connected, nothing purged
    for query in ("status[$ne]=x", "$where=1", "platform[]=fake"):
        assert portal.get(f"/dashboard?{query}").status_code == 400, query
    portal.logout()
    login_token = _csrf(portal)
    response = portal.post("/login", {"csrf_token": login_token, "email[$ne]": "", "password[$ne]": ""})
    assert response.status_code == 400
    assert portal.get("/dashboard", allow_redirects=False).status_code == 302


def _repeated(portal, page: str, action: str, fields: list[tuple[str, str]]):
    """Post the form of ``page`` whose action contains ``action`` with ``fields`` (repeats allowed)."""
    token = portal.csrf_from(page, action)
    return portal.http.post(portal.abs(action), data=[("csrf_token", token), *fields], allow_redirects=False)


def test_repeated_form_fields_refused(portal, db):
    """``email=a&email=b`` is refused with 400 naming the field, on every auth/account form, and
    nothing is written (before, the first value was silently used)."""
    other = "b@example.com"
    response = _repeated(portal, "/signup", "/signup", [
        ("email", "ann@example.com"), ("email", other), ("password", PASSWORD), ("password_confirm", PASSWORD)])
    assert response.status_code == 400
    assert "The field “email” was sent more than once; send each field once." in response.text
    assert db.users.count_documents({}) == 0

    portal.signup("ann@example.com")
    connect_fake(portal)
    before = snapshot(db)
    hash_before = db.users.find_one({})["password_hash"]
    for action, fields, name in [
        ("/account/password", [("current_password", PASSWORD), ("new_password", "a new long passphrase"),
                               ("new_password", "another passphrase!"),
                               ("new_password_confirm", "a new long passphrase")], "new_password"),
        ("/account/delete", [("password", "not my password"), ("password", PASSWORD)], "password"),
    ]:
        response = _repeated(portal, "/account", action, fields)
        assert response.status_code == 400, (action, response.status_code)
        assert f"The field “{name}” was sent more than once" in response.text
    response = _repeated(portal, "/connections", "/connections/fake/disconnect", [("purge", "0"), ("purge", "1")])
    assert response.status_code == 400 and "“purge” was sent more than once" in response.text
    assert snapshot(db) == before  # still connected, not deleted
    assert db.users.find_one({})["password_hash"] == hash_before
    assert portal.get("/dashboard", allow_redirects=False).status_code == 200  # still logged in

    portal.logout()
    for fields, name in [([("email", "ann@example.com"), ("email", other), ("password", PASSWORD)], "email"),
                         ([("email", "ann@example.com"), ("password", PASSWORD), ("password", "x")], "password")]:
        response = _repeated(portal, "/login", "/login", fields)
        assert response.status_code == 400
        assert f"The field “{name}” was sent more than once" in response.text
        assert portal.get("/dashboard", allow_redirects=False).status_code == 302  # not logged in
    assert portal.login("ann@example.com").status_code == 200  # one value per field still works


def test_emails_normalised():
    assert normalize_email("  Ann@Example.COM ") == "ann@example.com"
    assert normalize_email("ａｎｎ@ｅｘａｍｐｌｅ.com") == "ann@example.com"  # full-width forms (NFKC)
    assert normalize_email({"$ne": None}) == "" and normalize_email(None) == ""


def test_no_page_shows_a_token(portal, db, settings):
    portal.signup("ann@example.com")
    connect_fake(portal)
    portal.submit("/connections", "/sync/fake")
    connection = db.users.find_one({})["oauth"]["fake"]
    token = TokenCipher.from_settings(settings).decrypt(connection["token"])
    secrets_ = [token["access_token"], token["refresh_token"], connection["token"], connection["token"][:40]]
    pages = ["/dashboard?chart_platform=fake&chart_account=1001&chart_campaign=x", "/sync/status",
             "/connections/fake/callback?error=access_denied&state=x", "/nowhere"]
    for rule in portal.app.url_map.iter_rules():
        if "GET" in (rule.methods or ()) and not rule.arguments and rule.endpoint != "static":
            pages.append(rule.rule)
    for path in pages:
        for accept in ("text/html", "application/json"):
            response = portal.get(path, headers={"Accept": accept})
            assert not any(s in response.text for s in secrets_), path
            assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"], path
            assert response.headers["X-Content-Type-Options"] == "nosniff", path
    assert re.search(r"password_hash|\$2[aby]\$", "".join(portal.get(p).text for p in pages)) is None
