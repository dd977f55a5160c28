"""The platform protocol: what the portal and the pipelines need to know about an ad platform.

A connector module (``resources/platforms/<id>.py``) defines one ``Connector`` subclass and a
``pydantic-settings`` class for its own configuration (client id/secret, endpoints), and the registry
lists it. Nothing else in the project names a platform.

Shapes used throughout:

- token: ``dict`` as the platform's token endpoint returned it, normalised by the connector to carry
  ``access_token``, optionally ``refresh_token``, and ``expires_at`` (epoch seconds, UTC) when it expires.
  Tokens are encrypted before they are stored (``resources.crypto``).
- Account: an ad account / customer / shop the token reaches (see ``Account``).
- campaign document (``<id>_campaigns``): ``{account_id, campaign_id, name, status, currency,
  budget: Decimal|None (currency units), budget_period, ...extras}`` — ``user_id`` and sync
  bookkeeping are added by the pipeline.
- metric document (``<id>_campaign_metrics``): ``{account_id, campaign_id, date: "YYYY-MM-DD"
  (account-local date), impressions: int, clicks: int, spend: Decimal (currency units), currency,
  conversions: Decimal|None}``.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from decimal import Decimal
from typing import Any, Callable, ClassVar, Iterable, Iterator


class PlatformError(RuntimeError):
    """Base class for errors a connector raises. Messages never contain token text."""


class ReauthRequired(PlatformError):
    """The grant is revoked, expired or invalid: the user must reconnect. Never retried."""


class TransientPlatformError(PlatformError):
    """A temporary failure (5xx, network, internal error): retry with backoff."""


class RateLimited(PlatformError):
    """The platform asked us to slow down.

    Attributes:
        retry_after: seconds to wait before the next call (None when the platform did not say).
        account_id: set when the limit applies to that one account only (Meta's per-ad-account
            limits): the sync then skips the account, syncs the others and defers it; None means the
            whole app/user/token is limited and the partition stops at once.
    """

    def __init__(self, message: str, retry_after: float | None = None, account_id: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.account_id = account_id


class OAuthCallbackError(PlatformError):
    """The OAuth callback is invalid (bad state/HMAC/shop, provider error): answer 400."""


def exchange_callback_code(oauth_client, request, *, platform: str, denied: str,
                           rejected: Callable[[Any], str]) -> dict[str, Any]:
    """The token of an OAuth callback (authlib checks state and sends the PKCE verifier).

    ``platform`` names the provider in messages, ``denied`` is the message for ``error=access_denied``
    and ``rejected(exc.error)`` the message for a code the token endpoint refused.

    Raises:
        OAuthCallbackError: provider ``error=`` callback, no code, forged/missing state, rejected code,
            an unreachable token endpoint, or a token answer without an access token.
    """
    from authlib.integrations.base_client.errors import MismatchingStateError, OAuthError

    error = request.args.get("error")
    if error:
        if error == "access_denied":
            raise OAuthCallbackError(denied)
        raise OAuthCallbackError(f"{platform} returned an error: {error[:100]}")
    if not request.args.get("code"):
        raise OAuthCallbackError(f"The {platform} callback has no authorization code.")
    try:
        token = oauth_client.authorize_access_token()
    except MismatchingStateError:
        raise OAuthCallbackError("The OAuth state does not match this session (forged or stale callback); "
                                 "start the connection again.") from None
    except OAuthError as exc:
        raise OAuthCallbackError(rejected(exc.error)) from None
    except Exception as exc:
        import requests
        if isinstance(exc, requests.RequestException):
            raise OAuthCallbackError(f"{platform}'s token endpoint could not be reached; try again.") from None
        raise
    if not token or not token.get("access_token"):
        raise OAuthCallbackError(f"{platform}'s token answer has no access token.")
    return token


@dataclasses.dataclass(frozen=True)
class Account:
    """An account a token reaches.

    Attributes:
        id: platform account id as a string of digits (Google customer id without dashes,
            Meta ad account id without ``act_``, Shopify shop domain).
        name: descriptive name.
        currency: ISO 4217 code of the account's money.
        time_zone: IANA time zone; metric dates are local dates in it.
        manager: True for a manager (MCC) account, which has no metrics of its own.
        manager_id: the manager through which the account is reached (Google ``login-customer-id``).
        status: platform account status when the platform has one.
    """

    id: str
    name: str
    currency: str
    time_zone: str
    manager: bool = False
    manager_id: str | None = None
    status: str | None = None

    def to_doc(self) -> dict[str, Any]:
        """The form stored in ``users.oauth.<platform>.accounts``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> "Account":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in fields})


@dataclasses.dataclass
class CallStats:
    """Counts of API calls made through a connector session (reported as asset metadata)."""

    api_calls: int = 0
    retries: int = 0
    throttled_seconds: float = 0.0


class Connector:
    """Base class for a platform connector. Subclasses set the class attributes and implement the
    methods marked abstract; the rest has working defaults.

    Class attributes:
        id: platform id (``google``, ``meta``, ``shopify``) used in collection names, URLs, partitions.
        display_name: shown in the portal.
        api_concurrency: default number of concurrent partitions per platform (Dagster pool limit).
    """

    id: ClassVar[str]
    display_name: ClassVar[str]
    api_concurrency: ClassVar[int] = 2
    #: True when the connect flow needs user input first (Shopify's shop name); the portal then
    #: shows ``connect_form_fields`` before redirecting.
    connect_form_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings=None):
        if settings is None:
            from resources.settings import load_settings

            settings = load_settings(self.settings_class())
        self.settings = settings

    # ---- configuration -------------------------------------------------------------------------
    @classmethod
    def settings_class(cls):
        """The pydantic-settings class holding this platform's configuration."""
        raise NotImplementedError

    def is_configured(self) -> bool:
        """True when client id/secret are set, so the portal can offer "Connect"."""
        return True

    # ---- OAuth (portal) ------------------------------------------------------------------------
    def oauth_registration(self) -> dict[str, Any]:
        """Keyword arguments for ``authlib.integrations.flask_client.OAuth.register``: ``client_id``,
        ``client_secret``, ``authorize_url``, ``access_token_url``, ``client_kwargs`` (scope, PKCE),
        ``authorize_params``."""
        raise NotImplementedError

    def begin_authorization(self, oauth_client, redirect_uri: str, form: dict[str, str]):
        """Return the Flask redirect response to the platform's consent page.

        Raises:
            OAuthCallbackError: the form input is invalid (e.g. a malformed shop name).
        """
        return oauth_client.authorize_redirect(redirect_uri)

    def finish_authorization(self, oauth_client, request) -> dict[str, Any]:
        """Exchange the callback's code for a token and return the normalised token dict.

        Raises:
            OAuthCallbackError: forged/missing state, provider error, replayed or invalid code.
        """
        raise NotImplementedError

    # ---- token lifecycle (token asset) ---------------------------------------------------------
    def needs_refresh(self, token: dict[str, Any], now: dt.datetime, margin_seconds: int) -> bool:
        """True when the access token expires within ``margin_seconds`` of ``now`` (UTC)."""
        expires_at = token.get("expires_at")
        return expires_at is not None and float(expires_at) - now.timestamp() <= margin_seconds

    def refresh(self, token: dict[str, Any]) -> dict[str, Any]:
        """Return a new token dict (keeping fields the platform did not resend).

        Raises:
            ReauthRequired: the grant is revoked/invalid (e.g. ``invalid_grant``).
            TransientPlatformError: the token endpoint failed temporarily.
        """
        raise NotImplementedError

    def list_accounts(self, token: dict[str, Any]) -> list[Account]:
        """Every account the token reaches (managers included, flagged).

        Raises:
            ReauthRequired, TransientPlatformError, RateLimited.
        """
        raise NotImplementedError

    # ---- extraction (campaigns asset) ----------------------------------------------------------
    def open_session(self, token: dict[str, Any]) -> "ConnectorSession":
        """A per-(user, run) session holding the SDK client built for this token."""
        raise NotImplementedError


class ConnectorSession:
    """SDK client bound to one token. ``stats`` counts API calls.

    Implementations yield *mapped* documents (see the module docstring), streaming: they never hold
    a whole history in memory.
    """

    def __init__(self):
        self.stats = CallStats()

    def syncable(self, account: Account) -> bool:
        """False for accounts without campaigns/metrics of their own (e.g. Google manager accounts)."""
        return not account.manager

    def fetch_campaigns(self, account: Account) -> Iterator[dict[str, Any]]:
        """Campaign documents of one account, every status.

        Raises:
            ReauthRequired, TransientPlatformError, RateLimited.
        """
        raise NotImplementedError

    def fetch_daily_metrics(self, account: Account, start: dt.date, end: dt.date) -> Iterator[dict[str, Any]]:
        """Metric documents, one per (campaign, account-local date) in ``[start, end]`` with activity.

        Raises:
            ReauthRequired, TransientPlatformError, RateLimited.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release SDK resources (channels, sessions)."""


def settings_config(env_prefix: str):
    """The ``model_config`` of a connector's settings class: ``<env_prefix>*`` variables, the project's
    env files, unknown keys ignored."""
    from pydantic_settings import SettingsConfigDict

    from resources.settings import _env_files

    return SettingsConfigDict(env_prefix=env_prefix, env_file=_env_files(), env_file_encoding="utf-8",
                              extra="ignore", env_ignore_empty=True)


def micros_to_decimal(micros: int | None) -> Decimal | None:
    """Google-style micros (1,000,000 = one currency unit) to an exact Decimal in currency units."""
    if micros is None:
        return None
    return Decimal(int(micros)).scaleb(-6).normalize() if micros else Decimal(0)


def minor_units_to_decimal(value: str | int | None, exponent: int = 2) -> Decimal | None:
    """Minor units (cents; ``exponent`` digits, 0 for JPY) to an exact Decimal in currency units."""
    if value in (None, ""):
        return None
    return Decimal(int(value)).scaleb(-exponent)


def batched(iterable: Iterable, size: int) -> Iterator[list]:
    """Yield lists of up to ``size`` items from ``iterable`` (streams, never materialises all)."""
    batch: list = []
    for item in iterable:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
