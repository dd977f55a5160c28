"""Run the offline sandbox in a child process for the benchmarks (the API is remote, as in production,
so its CPU is not charged to the process being measured and the client's GIL is its own).

    python -m benchmarks.sandbox_proc '{"data_dir": "...", "seed": 7, "options": {...}, "platforms": [...]}'

Prints one line ``READY <json>`` (``env``, ``base_url``) when every platform server is up, then serves
until its stdin closes (the parent exits or calls ``stop``), so it never outlives the benchmark.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main() -> int:
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    from sandbox.server import SandboxServer

    server = SandboxServer(Path(spec["data_dir"]), seed=int(spec.get("seed", 7)), options=spec.get("options") or {},
                           platforms=spec.get("platforms") or None)
    server.start()
    try:
        forms = {pid: platform.connect_form_values() for pid, platform in server.platforms.items()}
        print("READY " + json.dumps({"env": server.env, "base_url": server.base_url, "connect_form_values": forms}),
              flush=True)
        sys.stdin.read()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
