"""What benchmarks/rest.py's client processes share: the work comes as JSON
on stdin, the records go as JSON on stdout with the process's own CPU time
over its run, so the benchmark can tell when a client, not the server, set
the pace. Standard library only: the clients must be ready before start_at.

stdout: {"records": {request id: record}, "cpu_s": CPU seconds from the
run's start, "wall_s": seconds from start_at to the run's end}"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def serve_share(run: Callable[[dict[str, Any]], Awaitable[dict[str, dict[str, Any]]]]) -> None:
    work = json.load(sys.stdin)
    cpu_before = time.process_time()
    records = asyncio.run(run(work))
    json.dump({"records": records, "cpu_s": time.process_time() - cpu_before, "wall_s": time.monotonic() - work["start_at"]}, sys.stdout)
