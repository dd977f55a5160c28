"""Install the peer connectors, each into its own virtual environment under ``data/bench/peers/``,
idempotently: a venv whose marker file names the same requirement is reused as it is.

    python -m benchmarks.peers_install [name ...]

The peers run unchanged; only a ``sitecustomize.py`` (written next to them, on their ``PYTHONPATH``
at run time, never inside their packages) points the Graph API host at the local sandbox.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import BENCH_DIR, OFFLINE_ENV, STARTUP_ENV

PEERS_DIR = BENCH_DIR / "peers"

#: peer name -> (pip requirement, console script)
PEERS: dict[str, tuple[str, str]] = {
    "airbyte": ("airbyte-source-facebook-marketing==6.1.9", "source-facebook-marketing"),
    "singer": ("tap-facebook==1.26.0", "tap-facebook"),
    "meltano": ("meltano-tap-facebook==0.9.0", "tap-facebook"),
}


def venv_dir(name: str) -> Path:
    return PEERS_DIR / name / "venv"


def executable(name: str) -> Path:
    return venv_dir(name) / "bin" / PEERS[name][1]


def _registry_env() -> dict[str, str]:
    """The environment for pip: the proxy variables as they were when the benchmark started, without its
    own dead proxy (``OFFLINE_ENV``, which keeps the peers' runs from reaching any real host), so pip
    reaches the package registry as this machine is configured to."""
    env = dict(os.environ)
    for key in OFFLINE_ENV:
        if key in STARTUP_ENV:
            env[key] = STARTUP_ENV[key]
        else:
            env.pop(key, None)
    return env


def install(name: str, python: str | None = None, timeout: float = 1200) -> dict:
    """Create ``data/bench/peers/<name>/venv`` and pip-install the peer (skipped when already there).

    Returns ``{"ok": bool, "seconds": float, "cached": bool, "error": str?}``; never raises.
    """
    requirement, _ = PEERS[name]
    venv = venv_dir(name)
    marker = venv / ".bench-installed"
    if marker.exists() and marker.read_text().strip() == requirement and executable(name).exists():
        return {"ok": True, "cached": True, "seconds": 0.0, "requirement": requirement}
    started = time.monotonic()
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "install.log"
    try:
        with open(log, "w") as out:
            if not (venv / "bin" / "python").exists():
                subprocess.run([python or sys.executable, "-m", "venv", str(venv)], check=True, stdout=out,
                               stderr=subprocess.STDOUT, timeout=300)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                            "--quiet", requirement], check=True, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                           env=_registry_env())
    except (subprocess.SubprocessError, OSError) as exc:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        return {"ok": False, "cached": False, "seconds": time.monotonic() - started, "requirement": requirement,
                "error": f"{type(exc).__name__}: {exc}\n{tail}"}
    if not executable(name).exists():
        return {"ok": False, "cached": False, "seconds": time.monotonic() - started, "requirement": requirement,
                "error": f"installed, but {executable(name)} is missing"}
    marker.write_text(requirement + "\n")
    return {"ok": True, "cached": False, "seconds": time.monotonic() - started, "requirement": requirement}


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(PEERS)
    results = {name: install(name) for name in names}
    print(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
