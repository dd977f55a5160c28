"""Google Ads connector on the official ``google-ads`` SDK (34.x, API v26).

OAuth: authorization code with PKCE (S256), ``access_type=offline`` + ``prompt=consent`` for a refresh
token, through authlib (portal) and authlib's requests ``OAuth2Session`` (refresh). Data: gRPC
``GoogleAdsService.SearchStream`` with GAQL (field lists below), ``CustomerService.ListAccessibleCustomers``.

Units: Google sends money in micros (1,000,000 = one unit of the customer's currency); documents carry
exact ``Decimal`` currency units (``micros_to_decimal``). ``segments.date`` is the customer's local date
(``customer.time_zone``) and is stored as Google returns it.

Sandbox TLS (choice documented here): the SDK always opens a TLS channel. When ``GOOGLE_ADS_CA_FILE`` is
set we do NOT touch the process-wide ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` (gRPC reads it only once per
process, before the first TLS channel, and it would replace the system roots for every other TLS
channel too). Instead ``_GoogleAdsClient`` — a small ``GoogleAdsClient`` subclass — builds the
synchronous channel exactly like the SDK's ``get_service`` (same interceptors, options and client
info) but passes ``ssl_credentials=grpc.ssl_channel_credentials(root_certificates=<CA file>)`` to the
transport's ``create_channel`` (which forwards it to ``google.api_core.grpc_helpers.create_channel``).
The trust is therefore per client and only for the sandbox; with no CA file the SDK's own
``get_service`` runs unchanged (production).

Error mapping (never includes token text):
- ``GoogleAdsException`` with authentication errors / ``UNAUTHENTICATED`` → ``ReauthRequired``, except
  developer-token problems and permission (authorization) errors → ``PlatformError`` (configuration or
  account access, reconnecting would not help);
- ``ResourceExhausted`` (not converted by the SDK) → ``RateLimited(retry_after=<QuotaErrorDetails.retry_delay>)``
  decoded from the ``GoogleAdsFailure`` in ``ex.response.trailing_metadata()``;
- ``InternalServerError`` / ``ServiceUnavailable`` / ``DeadlineExceeded`` → ``TransientPlatformError``,
  but ``ServiceUnavailable`` mentioning ``invalid_grant`` (the SDK's credentials failed to refresh: the
  grant was revoked) → ``ReauthRequired``.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterator

from pydantic_settings import BaseSettings

from resources.platforms.base import (
    Account,
    Connector,
    ConnectorSession,
    OAuthCallbackError,
    PlatformError,
    RateLimited,
    ReauthRequired,
    TransientPlatformError,
    exchange_callback_code,
    micros_to_decimal,
    settings_config,
)

log = logging.getLogger(__name__)

# ---- data: endpoints, version, scopes, field lists ----------------------------------------------
API_VERSION = "v26"
SCOPES = ["https://www.googleapis.com/auth/adwords"]
AUTHORIZE_URL = "https://accounts.google.com/o/oauth2/v2/auth"
TOKEN_URL = "https://oauth2.googleapis.com/token"
AUTHORIZE_PARAMS = {"access_type": "offline", "prompt": "consent"}
FAILURE_METADATA_KEY = f"google.ads.googleads.{API_VERSION}.errors.googleadsfailure-bin"

CUSTOMER_FIELDS = ["customer.id", "customer.descriptive_name", "customer.currency_code", "customer.time_zone",
                   "customer.manager", "customer.status"]
CUSTOMER_CLIENT_FIELDS = ["customer_client.id", "customer_client.descriptive_name", "customer_client.currency_code",
                          "customer_client.time_zone", "customer_client.manager", "customer_client.level",
                          "customer_client.status", "customer_client.hidden"]
CAMPAIGN_FIELDS = ["campaign.id", "campaign.name", "campaign.status", "campaign.advertising_channel_type",
                   "campaign.start_date_time", "campaign.end_date_time", "campaign_budget.amount_micros",
                   "campaign_budget.total_amount_micros", "campaign_budget.period",
                   "campaign_budget.delivery_method"]
METRIC_FIELDS = ["campaign.id", "segments.date", "metrics.impressions", "metrics.clicks", "metrics.cost_micros",
                 "metrics.conversions"]

CUSTOMER_QUERY = f"SELECT {', '.join(CUSTOMER_FIELDS)} FROM customer"
CUSTOMER_CLIENT_QUERY = (f"SELECT {', '.join(CUSTOMER_CLIENT_FIELDS)} FROM customer_client "
                         "WHERE customer_client.level <= 1")
CAMPAIGN_QUERY = f"SELECT {', '.join(CAMPAIGN_FIELDS)} FROM campaign ORDER BY campaign.id"
METRICS_QUERY = (f"SELECT {', '.join(METRIC_FIELDS)} FROM campaign "
                 "WHERE segments.date BETWEEN '{start}' AND '{end}'")

#: authentication error codes that are configuration problems, not a dead grant
_CONFIG_AUTHN_ERRORS = {"DEVELOPER_TOKEN_INVALID", "ORGANIZATION_NOT_ASSOCIATED_WITH_DEVELOPER_TOKEN",
                        "ORGANIZATION_NOT_RECOGNIZED", "ORGANIZATION_NOT_APPROVED", "NOT_ADS_USER",
                        "CUSTOMER_NOT_FOUND", "CLIENT_CUSTOMER_ID_INVALID"}


class GoogleAdsSettings(BaseSettings):
    """Google Ads configuration; environment variables ``GOOGLE_<FIELD>`` (e.g. ``GOOGLE_CLIENT_ID``).

    Fields:
        client_id, client_secret: the OAuth client (Google Cloud console).
        developer_token: Google Ads API developer token (sent as ``developer-token`` metadata).
        authorize_url, token_url: OAuth endpoints (production defaults).
        ads_endpoint: gRPC ``host:port`` of the Ads API; empty = production (googleads.googleapis.com).
        ads_ca_file: PEM file of extra trusted roots for ``ads_endpoint`` (the sandbox certificate).
        api_version: Google Ads API version (``v26``).
    """

    model_config = settings_config("GOOGLE_")

    client_id: str = ""
    client_secret: str = ""
    developer_token: str = ""
    authorize_url: str = AUTHORIZE_URL
    token_url: str = TOKEN_URL
    ads_endpoint: str = ""
    ads_ca_file: str = ""
    api_version: str = API_VERSION


# ---- SDK client with per-client trust roots ------------------------------------------------------

def _make_client_class():
    """Build the ``GoogleAdsClient`` subclass lazily (importing the SDK takes ~1 s)."""
    from google.ads.googleads.client import GoogleAdsClient

    class _GoogleAdsClient(GoogleAdsClient):
        """``GoogleAdsClient`` whose synchronous channels trust ``root_certificates`` (see module docstring)."""

        root_certificates: bytes | None = None

        def get_service(self, name, version=None, interceptors=None, is_async=False):
            version = self.version or version or API_VERSION
            if not self.root_certificates or is_async or name == "YouTubeVideoUploadService":
                return super().get_service(name, version=version, interceptors=interceptors, is_async=is_async)
            import grpc
            from google.ads.googleads import client as sdk_client
            from google.ads.googleads import util
            from google.ads.googleads.interceptors import ExceptionInterceptor, LoggingInterceptor, MetadataInterceptor
            from importlib import import_module

            module = import_module(f"google.ads.googleads.{version}.services.services."
                                   f"{util.convert_upper_case_to_snake_case(name)}")
            client_class = getattr(module, f"{name}Client")
            transport_class = client_class.get_transport_class(None)
            endpoint = self.endpoint or client_class.DEFAULT_ENDPOINT
            channel = transport_class.create_channel(
                host=endpoint, credentials=self.credentials, options=sdk_client._GRPC_CHANNEL_OPTIONS,
                ssl_credentials=grpc.ssl_channel_credentials(root_certificates=self.root_certificates))
            channel = grpc.intercept_channel(channel, *(list(interceptors or []) + [
                MetadataInterceptor(self.developer_token, self.login_customer_id, self.linked_customer_id,
                                    ads_assistant=self._ads_assistant),
                LoggingInterceptor(sdk_client._logger, version, endpoint),
                ExceptionInterceptor(version, use_proto_plus=self.use_proto_plus),
            ]))
            return client_class(transport=transport_class(channel=channel, client_info=sdk_client._CLIENT_INFO))

    return _GoogleAdsClient


_client_class = None
_client_class_lock = threading.Lock()


def _google_ads_client_class():
    global _client_class
    with _client_class_lock:
        if _client_class is None:
            _client_class = _make_client_class()
        return _client_class


# ---- error mapping ------------------------------------------------------------------------------

def _failure_from_metadata(metadata) -> Any | None:
    """Decode the ``GoogleAdsFailure`` from gRPC trailing metadata (None when absent/undecodable)."""
    if not metadata:
        return None
    for key, value in metadata:
        if key == FAILURE_METADATA_KEY:
            try:
                from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure
                return GoogleAdsFailure.deserialize(value)
            except Exception:  # pragma: no cover - malformed failure
                return None
    return None


def _error_codes(failure) -> list[tuple[str, str]]:
    """``[(error field, enum name)]`` of a ``GoogleAdsFailure``, e.g. ``("authentication_error", "OAUTH_TOKEN_EXPIRED")``."""
    codes = []
    for error in getattr(failure, "errors", None) or []:
        code = error.error_code
        field = type(code).pb(code).WhichOneof("error_code")
        if field:
            value = getattr(code, field)
            codes.append((field, getattr(value, "name", str(value))))
    return codes


def _retry_delay(failure) -> float | None:
    for error in getattr(failure, "errors", None) or []:
        details = error.details
        pb = type(details).pb(details)
        if pb.HasField("quota_error_details") and pb.quota_error_details.HasField("retry_delay"):
            delay = pb.quota_error_details.retry_delay
            return delay.seconds + delay.nanos / 1e9
    return None


def _trailing_metadata(exc) -> Any:
    response = getattr(exc, "response", None)
    try:
        return response.trailing_metadata() if response is not None else None
    except Exception:
        return None


class _TokenExpired(Exception):
    """Internal: the API said the access token expired; the session refreshes once and retries."""


def map_google_error(exc: BaseException, what: str) -> PlatformError | _TokenExpired | None:
    """The connector error for an SDK exception raised while doing ``what`` (None: not ours to map)."""
    from google.ads.googleads.errors import GoogleAdsException
    from google.api_core import exceptions as core
    from google.auth import exceptions as auth_exc

    if isinstance(exc, GoogleAdsException):
        codes = _error_codes(exc.failure)
        request_id = exc.request_id or "-"
        names = ", ".join(f"{f}.{n}" for f, n in codes) or "unknown"
        status = exc.error.code().name if hasattr(exc.error, "code") else ""
        message = f"Google Ads API error during {what}: {names} (request-id {request_id})"
        if any(n in ("DEVELOPER_TOKEN_INVALID", "DEVELOPER_TOKEN_PARAMETER_MISSING", "DEVELOPER_TOKEN_PROHIBITED",
                     "DEVELOPER_TOKEN_NOT_APPROVED", "DEVELOPER_TOKEN_NOT_ON_ALLOWLIST") for _, n in codes):
            return PlatformError(message + " — check GOOGLE_DEVELOPER_TOKEN")
        if any(f == "authorization_error" for f, _ in codes):
            return PlatformError(message + " — the Google user cannot access this account "
                                 "(check login-customer-id / account access)")
        if any(f == "authentication_error" and n == "OAUTH_TOKEN_EXPIRED" for f, n in codes):
            return _TokenExpired(message)
        if any(f == "authentication_error" and n in _CONFIG_AUTHN_ERRORS for f, n in codes):
            return PlatformError(message)
        if any(f == "authentication_error" for f, _ in codes) or status == "UNAUTHENTICATED":
            return ReauthRequired(message)
        if any(f == "quota_error" for f, _ in codes):
            return RateLimited(message, retry_after=_retry_delay(exc.failure))
        if any(f == "internal_error" for f, _ in codes) or status in ("INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return TransientPlatformError(message)
        return PlatformError(message)
    if isinstance(exc, core.ResourceExhausted):
        failure = _failure_from_metadata(_trailing_metadata(exc))
        codes = ", ".join(f"{f}.{n}" for f, n in _error_codes(failure)) or "RESOURCE_EXHAUSTED"
        return RateLimited(f"Google Ads API rate limit during {what}: {codes}", retry_after=_retry_delay(failure))
    if isinstance(exc, core.ServiceUnavailable) and "invalid_grant" in str(exc):
        return ReauthRequired(f"Google refused to refresh the access token during {what}: invalid_grant "
                              "(grant revoked or expired)")
    if isinstance(exc, (core.InternalServerError, core.ServiceUnavailable, core.DeadlineExceeded,
                        core.GatewayTimeout, core.BadGateway)):
        return TransientPlatformError(f"Google Ads API temporary failure during {what}: "
                                      f"{type(exc).__name__} ({exc.code})")
    if isinstance(exc, core.Unauthenticated):
        return ReauthRequired(f"Google Ads API rejected the credentials during {what}")
    if isinstance(exc, auth_exc.RefreshError):
        if "invalid_grant" in str(exc):
            return ReauthRequired(f"Google refused to refresh the access token during {what}: invalid_grant")
        return TransientPlatformError(f"Google token refresh failed during {what}")
    if isinstance(exc, auth_exc.TransportError):
        return TransientPlatformError(f"Google token endpoint unreachable during {what}")
    if isinstance(exc, core.GoogleAPICallError):
        return PlatformError(f"Google Ads API error during {what}: {type(exc).__name__} ({exc.code})")
    return None


# ---- connector ----------------------------------------------------------------------------------

def _normalise_token(token: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{access_token, refresh_token?, expires_at (epoch s), scope, token_type}`` from a token answer."""
    out = {k: token[k] for k in ("access_token", "refresh_token", "scope", "token_type") if token.get(k)}
    expires_at = token.get("expires_at")
    if expires_at is None and token.get("expires_in") is not None:
        expires_at = time.time() + float(token["expires_in"])
    if expires_at is not None:
        out["expires_at"] = int(expires_at)
    if previous:
        for key in ("refresh_token", "scope"):
            if key not in out and previous.get(key):
                out[key] = previous[key]
    return out


class GoogleAdsConnector(Connector):
    """Google Ads (``google``): OAuth through authlib, data through the google-ads SDK (gRPC, API v26).

    Accounts are customers; a manager (MCC) is listed with its clients (``manager_id`` = the manager,
    used as ``login-customer-id``). Documents: see ``GoogleAdsSession``.
    """

    id = "google"
    display_name = "Google Ads"
    api_concurrency = 2

    @classmethod
    def settings_class(cls):
        return GoogleAdsSettings

    def is_configured(self) -> bool:
        s = self.settings
        return bool(s.client_id and s.client_secret and s.developer_token)

    # ---- OAuth ---------------------------------------------------------------------------------
    def oauth_registration(self) -> dict[str, Any]:
        s = self.settings
        return {
            "client_id": s.client_id,
            "client_secret": s.client_secret,
            "authorize_url": s.authorize_url,
            "access_token_url": s.token_url,
            "client_kwargs": {"scope": " ".join(SCOPES), "code_challenge_method": "S256"},
            "authorize_params": dict(AUTHORIZE_PARAMS),
        }

    def finish_authorization(self, oauth_client, request) -> dict[str, Any]:
        """Exchange the callback's code (authlib checks state and sends the PKCE verifier).

        Returns ``{access_token, refresh_token, expires_at (epoch s), scope, token_type}``.

        Raises:
            OAuthCallbackError: provider ``error=`` callback, forged/missing state, bad/replayed code,
                missing refresh token, or an unreachable token endpoint.
        """
        token = exchange_callback_code(
            oauth_client, request, platform="Google",
            denied="Google access was denied (the consent screen was cancelled).",
            rejected=lambda error: f"Google rejected the authorization code: {error}")
        normalised = _normalise_token(dict(token))
        if not normalised.get("refresh_token"):
            raise OAuthCallbackError("Google did not return a refresh token (offline access was not granted).")
        return normalised

    # ---- token lifecycle -----------------------------------------------------------------------
    def refresh(self, token: dict[str, Any]) -> dict[str, Any]:
        """A new access token from the refresh token (the refresh token is kept: Google sends none).

        Raises:
            ReauthRequired: no refresh token, or ``invalid_grant`` (revoked/expired grant).
            TransientPlatformError: 5xx, network failure or a non-JSON answer.
            RateLimited: 429 from the token endpoint.
        """
        import requests
        from authlib.integrations.base_client.errors import OAuthError
        from authlib.integrations.requests_client import OAuth2Session

        refresh_token = token.get("refresh_token")
        if not refresh_token:
            raise ReauthRequired("No Google refresh token is stored; reconnect Google Ads.")
        s = self.settings
        session = OAuth2Session(s.client_id, s.client_secret, scope=" ".join(SCOPES),
                                token_endpoint_auth_method="client_secret_post")
        try:
            answer = session.refresh_token(s.token_url, refresh_token=refresh_token, timeout=30)
        except OAuthError as exc:
            if exc.error in ("invalid_grant", "unauthorized_client"):
                raise ReauthRequired(f"Google refused the refresh token: {exc.error} (revoked or expired grant); "
                                     "reconnect Google Ads.") from None
            if exc.error == "invalid_client":
                raise PlatformError("Google rejected the OAuth client credentials (check GOOGLE_CLIENT_ID/"
                                    "GOOGLE_CLIENT_SECRET).") from None
            raise TransientPlatformError(f"Google token refresh failed: {exc.error}") from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status == 429:
                retry = exc.response.headers.get("Retry-After")
                raise RateLimited("Google token endpoint rate limit (HTTP 429).",
                                  retry_after=float(retry) if retry and retry.isdigit() else None) from None
            raise TransientPlatformError(f"Google token endpoint failed with HTTP {status}.") from None
        except requests.RequestException as exc:
            raise TransientPlatformError(f"Google token endpoint unreachable: {type(exc).__name__}.") from None
        finally:
            session.close()
        return _normalise_token(dict(answer), previous=token)

    def list_accounts(self, token: dict[str, Any]) -> list[Account]:
        """Accessible customers, plus the clients of every manager among them.

        Each manager's clients come from ``customer_client`` (level 1) with ``login-customer-id`` = the
        manager; they carry ``manager_id``. Hidden clients are skipped.
        """
        session = self.open_session(token)
        try:
            return session.list_accounts()
        finally:
            session.close()

    def open_session(self, token: dict[str, Any]) -> "GoogleAdsSession":
        return GoogleAdsSession(self.settings, token)


class GoogleAdsSession(ConnectorSession):
    """SDK clients for one token, one ``GoogleAdsClient`` per ``login-customer-id`` (cached).

    Campaign document: ``{account_id, campaign_id (str), name, status (ENABLED|PAUSED|REMOVED),
    channel_type (SEARCH, PERFORMANCE_MAX, …), currency, budget (Decimal currency units or None),
    budget_period (DAILY|CUSTOM_PERIOD), budget_delivery, start_date, end_date ("YYYY-MM-DD" or None)}``.
    ``budget`` is the daily amount for DAILY budgets and the total for CUSTOM_PERIOD budgets.

    Metric document: ``{account_id, campaign_id, date ("YYYY-MM-DD", customer-local), impressions,
    clicks, spend (Decimal currency units from cost_micros), currency, conversions (Decimal)}``.
    """

    def __init__(self, settings: GoogleAdsSettings, token: dict[str, Any]):
        super().__init__()
        self.settings = settings
        self.token = token
        self._credentials = None
        self._clients: dict[str | None, Any] = {}
        self._services: dict[tuple[str | None, str], Any] = {}
        self._lock = threading.Lock()
        self._root_certificates: bytes | None = None
        if settings.ads_ca_file:
            try:
                self._root_certificates = Path(settings.ads_ca_file).read_bytes()
            except OSError:
                raise PlatformError(f"GOOGLE_ADS_CA_FILE cannot be read: {settings.ads_ca_file}") from None

    # ---- SDK plumbing --------------------------------------------------------------------------
    def _get_credentials(self):
        if self._credentials is None:
            from google.oauth2.credentials import Credentials

            s = self.settings
            expiry = None
            if self.token.get("expires_at") is not None:
                # google-auth compares against naive UTC datetimes
                expiry = dt.datetime.fromtimestamp(float(self.token["expires_at"]), dt.timezone.utc).replace(tzinfo=None)
            self._credentials = Credentials(
                token=self.token.get("access_token"), refresh_token=self.token.get("refresh_token"),
                client_id=s.client_id, client_secret=s.client_secret, token_uri=s.token_url, scopes=SCOPES,
                expiry=expiry)
        return self._credentials

    def _client(self, login_customer_id: str | None):
        with self._lock:
            client = self._clients.get(login_customer_id)
            if client is None:
                cls = _google_ads_client_class()
                client = cls(credentials=self._get_credentials(), developer_token=self.settings.developer_token,
                             endpoint=self.settings.ads_endpoint or None, login_customer_id=login_customer_id,
                             use_proto_plus=True, version=self.settings.api_version)
                client.root_certificates = self._root_certificates
                self._clients[login_customer_id] = client
            return client

    def _service(self, login_customer_id: str | None, name: str):
        key = (login_customer_id, name)
        service = self._services.get(key)
        if service is None:
            service = self._client(login_customer_id).get_service(name)
            self._services[key] = service
        return service

    def _force_refresh(self) -> None:
        """Refresh the shared credentials after the API said the access token expired."""
        from google.auth.transport.requests import Request

        try:
            self._get_credentials().refresh(Request())
        except Exception as exc:
            mapped = map_google_error(exc, "token refresh")
            raise (mapped if isinstance(mapped, PlatformError) else
                   TransientPlatformError("Google token refresh failed")) from None

    def _stream(self, customer_id: str, login_customer_id: str | None, query: str, what: str) -> Iterator[Any]:
        """Raw protobuf ``GoogleAdsRow``s of a SearchStream, yielded as batches arrive (small queries)."""
        for batch in self._stream_batches(customer_id, login_customer_id, query, what):
            yield from batch.results

    def _stream_batches(self, customer_id: str, login_customer_id: str | None, query: str,
                        what: str) -> Iterator[Any]:
        """Raw protobuf ``SearchGoogleAdsStreamResponse`` batches (up to 10,000 rows each) of a SearchStream.

        Memory: a parsed batch of 10,000 rows takes ~70 MB (every ``GoogleAdsRow`` carries the full
        struct of its message types), so at most one is alive at a time: the SDK's copy of the first
        batch (kept only to log it) is dropped, and a batch is released before the next is parsed —
        callers map a batch to documents and drop it before asking for the next (and must not keep
        rows, which keep their whole batch alive).

        Retries once, transparently, when the access token expired before any row was yielded.
        """
        for attempt in (1, 2):
            yielded = False
            service = self._service(login_customer_id, "GoogleAdsService")
            self.stats.api_calls += 1
            try:
                stream = service.search_stream(customer_id=customer_id, query=query)
                iterator = iter(stream)
                while True:
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        return
                    _drop_cached_first_response(stream)
                    pb = type(batch).pb(batch)
                    del batch
                    yielded = yielded or len(pb.results) > 0
                    yield pb
                    del pb
            except Exception as exc:
                mapped = map_google_error(exc, what)
                if mapped is None:
                    raise
                if isinstance(mapped, _TokenExpired):
                    if attempt == 1 and not yielded:
                        self.stats.retries += 1
                        self._force_refresh()
                        continue
                    mapped = ReauthRequired(str(mapped))
                raise mapped from None

    # ---- accounts ------------------------------------------------------------------------------
    def list_accounts(self) -> list[Account]:
        """See ``GoogleAdsConnector.list_accounts``."""
        resource_names = self._call_list_accessible()
        accounts: dict[str, Account] = {}
        for resource_name in resource_names:
            customer_id = resource_name.split("/")[-1]
            rows = list(self._stream(customer_id, customer_id, CUSTOMER_QUERY, "customer lookup"))
            if not rows:
                continue
            c = rows[0].customer
            account = Account(id=str(c.id), name=c.descriptive_name, currency=c.currency_code,
                              time_zone=c.time_zone, manager=bool(c.manager), status=_enum_name(c, "status"))
            accounts.setdefault(account.id, account)
            if account.manager:
                for row in self._stream(customer_id, customer_id, CUSTOMER_CLIENT_QUERY, "customer_client lookup"):
                    cc = row.customer_client
                    if cc.level == 0 or cc.hidden or str(cc.id) in accounts:
                        continue
                    accounts[str(cc.id)] = Account(
                        id=str(cc.id), name=cc.descriptive_name, currency=cc.currency_code, time_zone=cc.time_zone,
                        manager=bool(cc.manager), manager_id=account.id, status=_enum_name(cc, "status"))
        return list(accounts.values())

    def _call_list_accessible(self) -> list[str]:
        for attempt in (1, 2):
            service = self._service(None, "CustomerService")
            self.stats.api_calls += 1
            try:
                return list(service.list_accessible_customers().resource_names)
            except Exception as exc:
                mapped = map_google_error(exc, "ListAccessibleCustomers")
                if mapped is None:
                    raise
                if isinstance(mapped, _TokenExpired):
                    if attempt == 1:
                        self.stats.retries += 1
                        self._force_refresh()
                        continue
                    mapped = ReauthRequired(str(mapped))
                raise mapped from None
        raise AssertionError("unreachable")

    # ---- extraction ----------------------------------------------------------------------------
    def fetch_campaigns(self, account: Account) -> Iterator[dict[str, Any]]:
        """Campaign documents of one client customer (every status), streamed."""
        if account.manager:
            return
        login = account.manager_id or account.id
        for batch in self._stream_batches(account.id, login, CAMPAIGN_QUERY, f"campaigns of {account.id}"):
            docs = [_campaign_doc(account, row) for row in batch.results]
            del batch  # released before the next batch is parsed (see _stream_batches)
            yield from docs

    def fetch_daily_metrics(self, account: Account, start: dt.date, end: dt.date) -> Iterator[dict[str, Any]]:
        """Metric documents for ``[start, end]`` (customer-local dates), streamed as they arrive."""
        if account.manager or start > end:
            return
        login = account.manager_id or account.id
        query = METRICS_QUERY.format(start=start.isoformat(), end=end.isoformat())
        for batch in self._stream_batches(account.id, login, query, f"metrics of {account.id}"):
            docs = [_metric_doc(account, row) for row in batch.results]
            del batch  # released before the next batch is parsed (see _stream_batches)
            yield from docs

    def close(self) -> None:
        for service in self._services.values():
            try:
                service.transport.close()
            except Exception:  # pragma: no cover - best effort
                pass
        self._services.clear()
        self._clients.clear()


def _campaign_doc(account: Account, row) -> dict[str, Any]:
    """The campaign document of one raw ``GoogleAdsRow`` (see ``GoogleAdsSession``)."""
    c, b = row.campaign, row.campaign_budget
    period = _enum_name(b, "period")
    micros = b.total_amount_micros if period == "CUSTOM_PERIOD" and b.HasField("total_amount_micros") \
        else (b.amount_micros if b.HasField("amount_micros") else None)
    return {
        "account_id": account.id,
        "campaign_id": str(c.id),
        "name": c.name,
        "status": _enum_name(c, "status"),
        "channel_type": _enum_name(c, "advertising_channel_type"),
        "currency": account.currency,
        "budget": micros_to_decimal(micros),
        "budget_period": period,
        "budget_delivery": _enum_name(b, "delivery_method"),
        "start_date": c.start_date_time[:10] if c.start_date_time else None,
        "end_date": c.end_date_time[:10] if c.end_date_time else None,
    }


def _metric_doc(account: Account, row) -> dict[str, Any]:
    """The daily metric document of one raw ``GoogleAdsRow`` (see ``GoogleAdsSession``)."""
    m = row.metrics
    return {
        "account_id": account.id,
        "campaign_id": str(row.campaign.id),
        "date": row.segments.date,
        "impressions": int(m.impressions),
        "clicks": int(m.clicks),
        "spend": micros_to_decimal(m.cost_micros),
        "currency": account.currency,
        "conversions": Decimal(repr(float(m.conversions))).normalize() if m.conversions else Decimal(0),
    }


def _drop_cached_first_response(stream) -> None:
    """Forget the SDK's copy of a stream's first response (its response wrapper keeps it for the
    logging interceptor, which logs it only at DEBUG): it would hold a whole batch for the stream's
    life. ``stream`` is api_core's iterator around the SDK's wrapper."""
    wrapper = getattr(stream, "_wrapped", None)
    cache = wrapper.get_cache() if hasattr(wrapper, "get_cache") else None
    if cache is not None and getattr(cache, "initial_response_object", None) is not None:
        cache.initial_response_object = None


def _enum_name(message, field: str) -> str | None:
    """Name of an enum field of a raw protobuf message (``"PAUSED"``), None when unset/unknown."""
    value = getattr(message, field)
    descriptor = message.DESCRIPTOR.fields_by_name[field].enum_type
    entry = descriptor.values_by_number.get(value)
    if entry is None or entry.name in ("UNSPECIFIED",):
        return None
    return entry.name
