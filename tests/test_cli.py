"""The ``unified-ads`` console script, run as a user runs it: a subprocess with its own environment.

Bad token keys must end in one ``error: …`` line naming where the key came from (the
``TOKEN_ENCRYPTION_KEYS`` entry, or the key file and line) with a non-zero exit code, no traceback and
never the key's text.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from portal_helpers import Portal as PortalClient
from portal_helpers import query_of
from resources.crypto import TokenCipher
from resources.store import get_client

#: a "key" that is not one; it must never be echoed
GARBAGE_KEY = "not-a-key-SECRET-4f9a"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "unified-ads"
    return [str(script)] if script.exists() else [sys.executable, "-m", "resources.cli"]


def run_cli(args: list[str], data_dir: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``unified-ads <args>`` in ``data_dir`` (no ``.env`` there) with ``DATA_DIR=data_dir``."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("TOKEN_ENCRYPTION_KEYS", "UA_ENV_FILE", "PORTAL_BASE_URL")}
    environment.update({"DATA_DIR": str(data_dir), **(env or {})})
    return subprocess.run(_cli_command() + args, cwd=data_dir, env=environment, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line containing ``expected``, no key text."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert expected in errors[0], errors[0]
    assert GARBAGE_KEY not in output
    return errors[0]


def test_rotate_keys_names_the_key_file_line(tmp_path, store_uri):
    good = TokenCipher.generate_key()
    key_file = tmp_path / "token.keys"
    key_file.write_text(f"{good}\n\n{GARBAGE_KEY}\n")
    result = run_cli(["rotate-keys"], tmp_path, {"MONGODB_URI": store_uri})
    error = assert_one_line_error(result, f"line 3 of the key file {key_file} is not a valid Fernet key")
    assert "TOKEN_ENCRYPTION_KEYS" not in error  # the env var is not set: it is not to blame
    assert good not in result.stdout + result.stderr


def test_bad_key_in_env_var_stops_the_portal_with_one_line(tmp_path, store_uri):
    good = TokenCipher.generate_key()
    result = run_cli(["portal", "--port", str(_free_port())], tmp_path,
                     {"MONGODB_URI": store_uri, "TOKEN_ENCRYPTION_KEYS": f"{good},{GARBAGE_KEY}"})
    error = assert_one_line_error(result, "TOKEN_ENCRYPTION_KEYS entry #2 is not a valid Fernet key")
    assert "token.keys" not in error
    assert good not in result.stdout + result.stderr


@pytest.mark.parametrize("keys", [GARBAGE_KEY, " , "])
def test_bad_key_in_env_var_stops_the_demo_before_it_starts(tmp_path, keys):
    result = run_cli(["demo", "--once", "--portal-port", str(_free_port())], tmp_path,
                     {"TOKEN_ENCRYPTION_KEYS": keys}, timeout=60)
    expected = "entry #1 is not a valid Fernet key" if keys.strip(" ,") else "TOKEN_ENCRYPTION_KEYS holds no key"
    assert_one_line_error(result, expected)
    assert not (tmp_path / "dagster_home").exists() and not (tmp_path / "sandbox.env").exists()


def test_rotate_keys_re_encrypts_and_reports_tokens_no_key_opens(tmp_path, db, db_name, store_uri):
    old, new, lost = (TokenCipher.generate_key() for _ in range(3))
    token = {"access_token": "ya29.SECRET-rotate", "refresh_token": "1//r"}
    rotatable = db.users.insert_one({"email": "a@example.com", "oauth": {
        "google": {"status": "connected", "token": TokenCipher([old]).encrypt(token)}}}).inserted_id
    orphan_ciphertext = TokenCipher([lost]).encrypt(token)
    orphan = db.users.insert_one({"email": "b@example.com", "oauth": {
        "meta": {"status": "connected", "token": orphan_ciphertext}}}).inserted_id
    (tmp_path / "token.keys").write_text(f"{new}\n{old}\n")
    result = run_cli(["rotate-keys"], tmp_path, {"MONGODB_URI": store_uri, "MONGODB_DB": db_name})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "re-encrypted 1 token under the newest key" in result.stdout
    assert result.stderr.strip() == (
        f"error: 1 stored token cannot be decrypted with any configured key and was left unchanged "
        f"(user {orphan} meta); add the key it was encrypted with after the newest one and run "
        f"rotate-keys again")
    assert "SECRET" not in output and "Traceback" not in output
    rotated = db.users.find_one({"_id": rotatable})["oauth"]["google"]["token"]
    assert TokenCipher([new]).decrypt(rotated) == token  # the newest key alone opens it now
    assert db.users.find_one({"_id": orphan})["oauth"]["meta"]["token"] == orphan_ciphertext


@pytest.fixture
def start_portal(tmp_path, store_uri, sandbox):
    """Start ``unified-ads portal --port <free>`` (sandbox platforms configured); stopped afterwards."""
    procs: list[subprocess.Popen] = []

    def start(env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
        port = _free_port()
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("TOKEN_ENCRYPTION_KEYS", "UA_ENV_FILE", "PORTAL_BASE_URL")}
        environment.update({"DATA_DIR": str(tmp_path), "MONGODB_URI": store_uri,
                            "MONGODB_DB": f"test_cli_{port}", **(env or {})})
        proc = subprocess.Popen(_cli_command() + ["portal", "--port", str(port)], cwd=tmp_path,
                                env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return url, proc
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError("the portal did not start")

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        get_client(store_uri).drop_database(f"test_cli_{proc.args[-1]}")


def _redirect_uri_sent(url: str) -> str:
    """Sign up on the portal at ``url``, press Connect Google Ads; the redirect_uri sent to Google."""
    client = PortalClient(url=url, app=None, db=None, http=requests.Session())
    assert client.signup("port@example.com").status_code == 200
    response = client.submit("/connections", "/connections/google/connect", allow_redirects=False)
    assert response.status_code == 302, response.text
    return query_of(response.headers["Location"])["redirect_uri"]


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    proc.terminate()
    return proc.communicate(timeout=10)


def test_portal_port_sets_the_default_base_url(start_portal):
    url, proc = start_portal()
    assert _redirect_uri_sent(url) == f"{url}/connections/google/callback"
    out, err = _stop(proc)
    assert f"[portal] OAuth redirect URIs: {url}/connections/<platform>/callback" in out
    assert "PORTAL_BASE_URL" not in err


def test_portal_warns_when_the_base_url_names_another_port(start_portal):
    other = f"http://127.0.0.1:{_free_port()}"
    url, proc = start_portal({"PORTAL_BASE_URL": other})
    assert _redirect_uri_sent(url) == f"{other}/connections/google/callback"  # explicit value kept
    out, err = _stop(proc)
    port = url.rsplit(":", 1)[1]
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: PORTAL_BASE_URL is {other} (port {other.rsplit(':', 1)[1]}) but the portal listens on "
        f"port {port}: OAuth redirects will go to {other}/connections/… — unset PORTAL_BASE_URL or make it "
        f"name port {port}, unless a proxy forwards that address here"]


def test_portal_does_not_warn_when_the_base_url_names_its_port(start_portal, tmp_path):
    port = _free_port()
    # the explicit value may also come from the env file named by UA_ENV_FILE
    (tmp_path / "portal.env").write_text(f"PORTAL_BASE_URL=http://localhost:{port}/\n")
    environment = {**os.environ, "UA_ENV_FILE": str(tmp_path / "portal.env")}
    environment.pop("PORTAL_BASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", "from resources.cli import portal_base_url_for_port as f; "
                               f"print(f({port})); print(f({port + 1})[1] is not None)"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"('http://localhost:{port}', None)", "True"]


def test_rotate_keys_help_names_both_key_sources(tmp_path):
    for args in (["rotate-keys", "--help"], ["--help"]):
        result = run_cli(args, tmp_path)
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split())  # argparse wraps lines
        assert "TOKEN_ENCRYPTION_KEYS" in text and "data/token.keys" in text, text


def test_an_invalid_setting_is_one_error_line_naming_the_variable(tmp_path):
    """A bad value stops the command before anything starts: one line naming the environment
    variable and the rule, never the value (settings hold secrets); an empty value means the default."""
    bad = run_cli(["store"], tmp_path, {"EMBEDDED_STORE_CACHE_MB": "0", "LOOKBACK_DAYS": GARBAGE_KEY,
                                        "MONGODB_DB": "bad db/name"})
    line = assert_one_line_error(bad, "EMBEDDED_STORE_CACHE_MB: Input should be greater than or equal to 16")
    assert "LOOKBACK_DAYS: Input should be a valid integer" in line
    assert "MONGODB_DB: Value error, a MongoDB database name has 1–63 bytes" in line
    assert not (tmp_path / "store.uri").exists() and not (tmp_path / "store").exists()  # nothing started


def test_invalid_connector_and_empty_settings(monkeypatch):
    """A connector's settings fail the same way (named with the platform's prefix); an empty value
    means the default."""
    from resources.platforms.meta import MetaAdsConnector
    from resources.settings import ConfigurationError, Settings

    monkeypatch.setenv("META_PAGE_SIZE", GARBAGE_KEY)
    with pytest.raises(ConfigurationError) as caught:
        MetaAdsConnector()
    assert "META_PAGE_SIZE: Input should be a valid integer" in str(caught.value)
    assert GARBAGE_KEY not in str(caught.value)
    monkeypatch.setenv("META_PAGE_SIZE", "")
    assert MetaAdsConnector().settings.page_size == 500
    monkeypatch.setenv("EMBEDDED_STORE_CACHE_MB", "")
    assert Settings().embedded_store_cache_mb == 512
    monkeypatch.setenv("MONGODB_URI", "  ")
    assert Settings().mongodb_uri == ""  # only spaces: not set, the embedded store is used
