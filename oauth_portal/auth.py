"""Blueprint ``auth``: sign up, log in, log out (here or everywhere), and the account page (change
password, delete the account).

Passwords are hashed with bcrypt. Login failures say only "invalid email or password", take the same
time whether or not the email exists, and are rate-limited per client IP (as are sign-ups and the
password-confirmed account actions). Each login issues a new server-side session id (see
``UserRepository.start_session``); logging out forgets it, changing the password ends every other one.
"""
from __future__ import annotations

import logging
import re
import unicodedata
from urllib.parse import urlsplit

import bcrypt
from flask import Blueprint, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import current_user, login_required, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import EmailField, HiddenField, PasswordField
from wtforms.validators import DataRequired, EqualTo, Length, Regexp, ValidationError

from oauth_portal.core import PortalUser, portal_state
from oauth_portal.extensions import limiter
from resources.repositories import DuplicateEmail, delete_user_everywhere, normalize_email

bp = Blueprint("auth", __name__)
log = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 10
#: bcrypt only looks at the first 72 bytes; longer passwords are refused rather than truncated.
MAX_PASSWORD_BYTES = 72

#: A small list of passwords that meet the length rule but are among the most used ones.
COMMON_PASSWORDS = frozenset({
    "password12", "password123", "password1234", "password!1", "passw0rd12", "p@ssw0rd12",
    "1234567890", "12345678910", "123456789a", "0123456789", "0987654321", "1111111111",
    "1q2w3e4r5t", "qwertyuiop", "qwerty1234", "qwerty12345", "qwerty123456", "asdfghjkl1",
    "iloveyou12", "letmein123", "welcome123", "changeme123", "admin12345", "administrator",
    "football12", "baseball12", "sunshine12", "princess12", "monkey1234", "dragon1234",
    "trustno1234", "abc1234567", "abcdefghij", "zaq12wsxcde", "michael123", "superman12",
    "starwars12", "whatever12", "computer12", "internet12", "marketing1", "facebook12",
    "google1234", "shopify123",
})

EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


#: Unicode categories refused anywhere in an email: controls (Cc, e.g. NUL) and format characters
#: (Cf: bidi overrides such as U+202E, zero-width spaces and joiners, soft hyphens).
REFUSED_EMAIL_CATEGORIES = frozenset({"Cc", "Cf"})


def _strip(value):
    return value.strip() if isinstance(value, str) else value


def has_control_characters(value: str) -> bool:
    """True when ``value`` (as typed, or once NFKC-normalised the way it would be stored) holds a
    control or format character (Unicode category Cc or Cf), e.g. NUL, U+202E or U+200B."""
    return any(unicodedata.category(ch) in REFUSED_EMAIL_CATEGORIES
               for text in (value, normalize_email(value)) for ch in text)


def no_control_characters(message: str):
    """WTForms validator refusing a value with control/format characters (``has_control_characters``)."""

    def _check(form, field):
        if field.errors:  # already refused (e.g. by the pattern): one message is enough
            return
        if isinstance(field.data, str) and has_control_characters(field.data):
            raise ValidationError(message)

    return _check

# A dummy hash so a login for an unknown email costs as much as one for a known email.
_DUMMY_HASH: dict[int, bytes] = {}


def _rounds() -> int:
    return int(current_app.config.get("BCRYPT_ROUNDS", 12))


def hash_password(password: str) -> str:
    """bcrypt hash (str) of a password, cost from ``BCRYPT_ROUNDS``."""
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=_rounds())).decode("ascii")


def check_password(password: str, password_hash: str | None) -> bool:
    """True when ``password`` matches the bcrypt hash; spends the same time when there is no hash."""
    candidate = password.encode("utf-8")
    if len(candidate) > MAX_PASSWORD_BYTES:
        return False
    if not password_hash:
        rounds = _rounds()
        dummy = _DUMMY_HASH.setdefault(rounds, bcrypt.hashpw(b"dummy-password", bcrypt.gensalt(rounds=rounds)))
        bcrypt.checkpw(candidate, dummy)
        return False
    try:
        return bcrypt.checkpw(candidate, password_hash.encode("ascii"))
    except ValueError:
        return False


def password_problem(password: str, email: str = "") -> str | None:
    """Why a password is not acceptable, in plain words; None when it is fine."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"Use at least {MIN_PASSWORD_LENGTH} characters."
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        return f"Use at most {MAX_PASSWORD_BYTES} bytes (about {MAX_PASSWORD_BYTES} characters)."
    lowered = password.lower()
    if lowered in COMMON_PASSWORDS or len(set(lowered)) <= 2:
        return "This password is too common. Choose something less guessable."
    email = normalize_email(email)
    if email and (lowered == email or lowered == email.split("@")[0]):
        return "Do not use your email address as your password."
    return None


def is_safe_next(target: str | None) -> bool:
    """True for a local path (``/dashboard?x=1``); False for absolute or scheme-relative URLs."""
    if not target or not target.startswith("/") or target.startswith("//") or target.startswith("/\\"):
        return False
    if any(ch in target for ch in "\\\r\n\t") or any(ord(ch) < 32 for ch in target):
        return False
    parts = urlsplit(target)
    return not parts.scheme and not parts.netloc


class SignupForm(FlaskForm):
    """Email + password (twice)."""

    email = EmailField("Email", filters=[_strip], validators=[
        DataRequired("Enter your email address."), Length(max=254),
        Regexp(EMAIL_PATTERN, message="Enter a valid email address."),
        no_control_characters("Enter a valid email address.")])
    password = PasswordField("Password", validators=[DataRequired("Choose a password.")])
    password_confirm = PasswordField("Repeat password", validators=[
        DataRequired("Repeat the password."), EqualTo("password", message="The passwords do not match.")])

    def validate_password(self, field):
        problem = password_problem(field.data or "", self.email.data or "")
        if problem:
            raise ValidationError(problem)


class LoginForm(FlaskForm):
    """Email + password, and where to go afterwards."""

    email = EmailField("Email", filters=[_strip], validators=[DataRequired("Enter your email address."), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired("Enter your password."), Length(max=1024)])
    next = HiddenField()


def _start_session(doc: dict) -> None:
    """Renew the session: drop everything in it, issue a new server-side session id, and log the user
    in under their current epoch (a session fixed before login is never the one used after it)."""
    session.clear()
    session["epoch"] = int(doc.get("session_epoch", 0))
    session["sid"] = portal_state().users.start_session(doc["_id"])
    login_user(PortalUser(doc))


def _end_session() -> None:
    """Forget this browser's session id on the server, then clear the cookie session."""
    if current_user.is_authenticated:
        portal_state().users.end_session(current_user.oid, session.get("sid"))
    logout_user()
    session.clear()


def _after_login_target(candidate: str | None) -> str:
    return candidate if is_safe_next(candidate) else url_for("dashboard.dashboard")


@bp.route("/signup", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["SIGNUP_RATE_LIMIT"], methods=["POST"])
def signup():
    """Create an account, then log in. Duplicate email → 400 and nothing written."""
    if current_user.is_authenticated:
        return redirect(url_for("dashboard.dashboard"))
    form = SignupForm()
    if request.method == "GET":
        return render_template("auth/signup.html", form=form)
    if not form.validate_on_submit():
        return render_template("auth/signup.html", form=form), 400
    users = portal_state().users
    email = normalize_email(form.email.data)
    if users.find_by_email(email) is not None:
        form.email.errors.append("An account with this email already exists. Log in instead.")
        return render_template("auth/signup.html", form=form), 400
    try:
        doc = users.create(email, hash_password(form.password.data))
    except DuplicateEmail:
        form.email.errors.append("An account with this email already exists. Log in instead.")
        return render_template("auth/signup.html", form=form), 400
    _start_session(doc)
    flash("Welcome! Your account is ready. Connect an ad platform to get started.", "success")
    return redirect(url_for("connections.index"))


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT"], methods=["POST"])
def login():
    """Log in. Failures are generic; ``next`` is honoured only for local paths."""
    form = LoginForm()
    if request.method == "GET":
        if current_user.is_authenticated:
            return redirect(_after_login_target(request.args.get("next")))
        form.next.data = request.args.get("next", "") if is_safe_next(request.args.get("next")) else ""
        return render_template("auth/login.html", form=form)
    if not form.validate_on_submit():
        return render_template("auth/login.html", form=form), 400
    doc = portal_state().users.find_by_email(form.email.data)
    if not check_password(form.password.data, doc.get("password_hash") if doc else None):
        form.password.errors.append("Invalid email or password.")
        return render_template("auth/login.html", form=form), 401
    _start_session(doc)
    return redirect(_after_login_target(form.next.data or request.args.get("next")))


@bp.post("/logout")
def logout():
    """Log out this browser (POST with CSRF token); its session id stops working on the server too."""
    _end_session()
    flash("You are logged out.", "info")
    return redirect(url_for("auth.login"))


@bp.post("/logout-everywhere")
@login_required
def logout_everywhere():
    """End every session of the user, on every device (bumps the user's session epoch)."""
    portal_state().users.bump_session_epoch(current_user.oid)
    logout_user()
    session.clear()
    flash("You are logged out on every device.", "info")
    return redirect(url_for("auth.login"))


# ---- account: change password, delete -----------------------------------------------------------
class ChangePasswordForm(FlaskForm):
    """Current password, then the new one twice."""

    current_password = PasswordField("Current password", validators=[
        DataRequired("Enter your current password."), Length(max=1024)])
    new_password = PasswordField("New password", validators=[DataRequired("Choose a new password.")])
    new_password_confirm = PasswordField("Repeat the new password", validators=[
        DataRequired("Repeat the new password."), EqualTo("new_password", message="The passwords do not match.")])

    def validate_new_password(self, field):
        problem = password_problem(field.data or "", current_user.email)
        if problem:
            raise ValidationError(problem)


class DeleteAccountForm(FlaskForm):
    """The password, to confirm that the person at the keyboard owns the account."""

    password = PasswordField("Password", validators=[DataRequired("Enter your password to confirm."),
                                                     Length(max=1024)])


def _account_page(password_form=None, delete_form=None, status: int = 200):
    return render_template("auth/account.html", password_form=password_form or ChangePasswordForm(),
                           delete_form=delete_form or DeleteAccountForm(),
                           created_at=current_user.doc.get("created_at"),
                           platforms=[c.display_name for pid, c in portal_state().connectors.items()
                                      if current_user.connection(pid)]), status


@bp.get("/account")
@login_required
def account():
    """The account page: change password, log out everywhere, delete the account."""
    return _account_page()


@bp.post("/account/password")
@login_required
@limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT"])
def change_password():
    """Check the current password, store a new bcrypt hash, end every other session and renew this one."""
    form = ChangePasswordForm()
    if not form.validate_on_submit():
        return _account_page(password_form=form, status=400)
    users = portal_state().users
    doc = users.get(current_user.oid)
    if doc is None or not check_password(form.current_password.data, doc.get("password_hash")):
        form.current_password.errors.append("The current password is not correct.")
        return _account_page(password_form=form, status=400)
    users.set_password(current_user.oid, hash_password(form.new_password.data))
    users.bump_session_epoch(current_user.oid)  # every other browser is logged out
    _start_session(users.get(current_user.oid))
    flash("Your password was changed. Other devices were logged out.", "success")
    return redirect(url_for("auth.account"))


@bp.post("/account/delete")
@login_required
@limiter.limit(lambda: current_app.config["LOGIN_RATE_LIMIT"])
def delete_account():
    """Delete the account after a password check: the user, every token, and every document with the
    user's id in every platform collection and ``sync_requests``. Dagster's connections sensors then
    drop the user's partitions (the portal never calls Dagster)."""
    form = DeleteAccountForm()
    if not form.validate_on_submit():
        return _account_page(delete_form=form, status=400)
    state = portal_state()
    doc = state.users.get(current_user.oid)
    if doc is None or not check_password(form.password.data, doc.get("password_hash")):
        form.password.errors.append("The password is not correct; nothing was deleted.")
        return _account_page(delete_form=form, status=400)
    counts = delete_user_everywhere(state.db, current_user.oid, list(state.connectors))
    log.info("account %s deleted (%d documents)", current_user.id, sum(counts.values()))
    logout_user()
    session.clear()
    flash("Your account was deleted, with every connection and all synced data.", "success")
    return redirect(url_for("auth.signup"))
