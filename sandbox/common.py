"""Pieces shared by every platform sandbox: a stable self-signed certificate, fault knobs and
deterministic seeded randomness.

- ``ensure_certificate(directory)`` → ``(cert_path, key_path)``: a self-signed certificate for
  ``localhost`` and ``127.0.0.1`` (subject alternative names), generated once with ``cryptography``
  and reused on later runs. It stays stable because gRPC may read its trust roots only once per
  process; a certificate that changed under a running process would no longer be trusted.
- ``FaultInjector``: a thread-safe queue of injected faults ("the next N calls fail with X") plus an
  artificial latency, consumed by the platform servers.
- ``digest_units(*parts)``/``stable_int(*parts)``/``seeded_random(*parts)``: randomness derived from a
  hash of its inputs (seed, customer, campaign, date …), so any value can be recomputed on the fly in
  constant memory and is identical across runs and processes (no ``hash()`` randomisation).
- ``SHARED_CAMPAIGN_NAMES``: campaign names several platform sandboxes use on purpose (ad campaign
  names at Google/Meta, ``utm_campaign`` values of Shopify orders), so ad spend and shop sales can be
  joined by name in the demo data.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import random
import struct
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CERT_FILE = "sandbox-cert.pem"

#: Campaign names shared across platform sandboxes: Google/Meta name some campaigns like this and
#: Shopify orders carry them as ``utm_campaign``, so spend (ads) joins sales (shop) by name.
SHARED_CAMPAIGN_NAMES: tuple[str, ...] = (
    "black_friday_2026",
    "spring_sale",
    "retargeting_q4",
    "summer_clearance",
    "holiday_gift_guide",
    "new_arrivals_launch",
    "brand_awareness",
    "cyber_monday_2026",
)
KEY_FILE = "sandbox-key.pem"

_cert_lock = threading.Lock()


def ensure_certificate(directory: Path) -> tuple[Path, Path]:
    """Return ``(cert_path, key_path)`` of the sandbox's TLS certificate, creating it once.

    The certificate is self-signed (it is its own trust root: ``CA:TRUE``), valid for ten years, for
    DNS ``localhost`` and IP ``127.0.0.1``. Files are written atomically (temp file + rename), the key
    with mode 0600, so concurrent starters never see half-written files.
    """
    directory = Path(directory)
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    with _cert_lock:
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Unified Ads Sandbox")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _atomic_write(key_path, key_pem, 0o600)
        _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return cert_path, key_path


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


# ---- deterministic randomness -----------------------------------------------------------------

def _digest(*parts: Any) -> bytes:
    text = "\x1f".join(str(p) for p in parts).encode()
    return hashlib.blake2b(text, digest_size=64).digest()


def stable_int(*parts: Any, bits: int = 63) -> int:
    """A non-negative integer derived from ``parts`` (stable across processes and runs)."""
    return int.from_bytes(_digest(*parts)[:8], "big") >> (64 - bits)


def digest_units(*parts: Any, count: int = 8) -> tuple[float, ...]:
    """``count`` (≤ 16) independent uniform floats in [0, 1) derived from ``parts``."""
    if not 0 < count <= 16:
        raise ValueError("count must be between 1 and 16")
    words = struct.unpack(">16I", _digest(*parts))
    return tuple(w / 4294967296.0 for w in words[:count])


def seeded_random(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded from ``parts`` (for generating static entities like campaigns)."""
    return random.Random(stable_int(*parts))


# ---- fault knobs ------------------------------------------------------------------------------

@dataclasses.dataclass
class Fault:
    """One injected failure.

    Attributes:
        kind: platform-specific error kind (Google: ``RESOURCE_EXHAUSTED``, ``INTERNAL``, ``UNAVAILABLE``…).
        retry_delay: seconds the platform tells the caller to wait (rate-limit kinds).
        target: which endpoint family it applies to (e.g. ``api`` or ``token``).
        extra: anything else the platform needs.
    """

    kind: str
    retry_delay: float | None = None
    target: str = "api"
    extra: dict = dataclasses.field(default_factory=dict)


class FaultInjector:
    """Thread-safe fault queue and latency knob.

    ``inject(kind, count=N)`` makes the next N matching calls fail; ``take(target)`` is called by the
    server once per incoming call and returns the fault to apply (or None); ``delay()`` sleeps for the
    configured latency.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[Fault] = []
        self.latency: float = 0.0

    def inject(self, kind: str, count: int = 1, *, retry_delay: float | None = None, target: str = "api",
               **extra: Any) -> None:
        """Queue ``count`` (1–1000) faults of ``kind`` for calls to ``target``.

        Raises:
            ValueError: ``count`` out of range (the knob answers 400).
        """
        if isinstance(count, bool) or (isinstance(count, float) and not count.is_integer()):
            raise ValueError(f"count must be a whole number, not {count!r}")
        count = int(count)  # also "3" from a form
        if not 1 <= count <= 1000:
            raise ValueError(f"count must be between 1 and 1000, not {count}")
        if retry_delay is not None and not 0 <= float(retry_delay) <= 3600:
            raise ValueError("a retry delay must be between 0 and 3600 seconds")
        with self._lock:
            for _ in range(count):
                self._queue.append(Fault(kind=kind, retry_delay=retry_delay, target=target, extra=dict(extra)))

    def take(self, target: str = "api") -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self._queue):
                if fault.target == target:
                    return self._queue.pop(index)
        return None

    def pending(self, target: str | None = None) -> int:
        with self._lock:
            return sum(1 for f in self._queue if target is None or f.target == target)

    def set_latency(self, seconds: float) -> None:
        """Delay every call by ``seconds`` (0–60).

        Raises:
            ValueError: out of range or not a number (the knob answers 400).
        """
        seconds = float(seconds)
        if not 0 <= seconds <= 60:  # also refuses NaN
            raise ValueError(f"latency must be between 0 and 60 seconds, not {seconds}")
        self.latency = seconds

    def delay(self) -> None:
        if self.latency:
            time.sleep(self.latency)

    def reset(self) -> None:
        with self._lock:
            self._queue.clear()
        self.latency = 0.0


# ---- persisted OAuth state ----------------------------------------------------------------------
def read_state_file(path: Path | None) -> dict | None:
    """The JSON object saved by ``write_state_file``, or None when there is none or it is unreadable."""
    if not path or not Path(path).exists():
        return None
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        logging.getLogger(__name__).warning("ignoring an unreadable sandbox state file %s", path)
        return None
    return state if isinstance(state, dict) else None


def write_state_file(path: Path | None, state: dict) -> None:
    """Save a platform sandbox's grants/tokens as JSON (mode 0600, atomic rename), so connections made
    before a sandbox restart keep working. No-op without a path."""
    if not path:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(state, handle)
    os.replace(tmp, path)


def redirect_allowed(allowed, redirect_uri: str) -> bool:
    """Whether an OAuth client may be sent to ``redirect_uri``: one of ``allowed`` when the client
    registered any, otherwise any loopback http(s) URI without a fragment."""
    if allowed:
        return redirect_uri in allowed
    parts = urlsplit(redirect_uri)
    return parts.scheme in ("http", "https") and parts.hostname in ("127.0.0.1", "localhost", "::1") \
        and not parts.fragment


def request_body() -> dict:
    """The JSON or form body of an admin-knob request (``{}`` when empty).

    Raises:
        ValueError: a body that is neither a JSON object nor a form (the knob answers 400).
    """
    from flask import request

    data = request.get_json(silent=True, force=True) if request.get_data() else {}
    if isinstance(data, dict):
        return data
    form = request.form.to_dict()
    if form:
        return form
    raise ValueError("the body must be a JSON object (or a form)")


def admin_blueprint(name: str, url_prefix: str):
    """A Flask blueprint for a platform's ``/_sandbox/<platform>`` knobs: a bad value (``ValueError``,
    ``TypeError``) answers ``400 {"error": …}`` instead of a 500 page."""
    from flask import Blueprint, jsonify

    bp = Blueprint(name, __name__, url_prefix=url_prefix)

    @bp.errorhandler(ValueError)
    @bp.errorhandler(TypeError)
    @bp.errorhandler(OverflowError)
    def _bad_value(exc):
        return jsonify({"error": f"bad knob value: {str(exc)[:200]}"}), 400

    return bp
