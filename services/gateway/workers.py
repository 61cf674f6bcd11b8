"""`pagewire gateway --gateway-workers N`: N gateway processes on the same
public gRPC and REST ports (SO_REUSEPORT: the kernel spreads new
connections over them), each with its own streams to the tokenizer workers
and the engine replicas, which multiplex them already.

The process that was started runs no gateway itself: it starts the workers
(`pagewire gateway` again, told its index in the environment), restarts one
that dies once all have been ready, and on SIGTERM stops them all at once,
each draining its own requests. It makes a fresh directory for the run:
the slots file in which the workers count their requests in flight, so that
--max-concurrent-requests bounds the whole server (admission.py), and
PROMETHEUS_MULTIPROC_DIR, in which each worker writes its request metrics,
so that /metrics on any worker shows the whole server (metrics.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pagewire.services.common.children import ChildCommand, Supervision, flag, run_children
from pagewire.services.common.config import env_name
from pagewire.services.common.logging import get_logger
from pagewire.services.gateway.admission import create_slots, workers_ready
from pagewire.services.gateway.config import GatewayConfig

log = get_logger("gateway")

# Set by the supervising gateway in each worker's environment.
WORKER_ENV = "PAGEWIRE_GATEWAY_WORKER"
SLOTS_ENV = "PAGEWIRE_GATEWAY_SLOTS"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
READY_POLL_S = 0.2


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker stands among its peers."""

    index: int
    slots: Path

    @classmethod
    def from_environment(cls) -> WorkerPlace | None:
        """This process's place, when a supervising gateway started it."""
        index = os.environ.get(WORKER_ENV)
        if index is None:
            return None
        return cls(int(index), Path(os.environ[SLOTS_ENV]))


def worker_commands(config: GatewayConfig, run_dir: Path) -> dict[str, ChildCommand]:
    """Each worker's command line (the whole config, as flags but for secrets,
    which go in its environment) and place."""
    argv = [sys.executable, "-m", "pagewire.services.cli", "gateway"]
    env = {MULTIPROC_ENV: str(run_dir / "metrics"), SLOTS_ENV: str(run_dir / "slots")}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "log_format" and value == "auto":
            # The workers write to a pipe, where "auto" would mean JSON even on a terminal.
            value = "console" if sys.stderr.isatty() else "json"
        if f.metadata.get("secret"):
            env[env_name(f.name)] = str(value)
        else:
            argv += flag(f.name, value)
    return {f"gateway-{index}": ChildCommand(argv, env | {WORKER_ENV: str(index)}) for index in range(config.gateway_workers)}


async def _until_ready(slots: Path) -> None:
    while not workers_ready(slots):
        await asyncio.sleep(READY_POLL_S)


async def run_workers(config: GatewayConfig) -> int:
    run_dir = Path(tempfile.mkdtemp(prefix="pagewire-gateway-"))
    try:
        (run_dir / "metrics").mkdir()
        create_slots(run_dir / "slots", config.gateway_workers)
        commands = worker_commands(config, run_dir)
        supervision = Supervision(
            config.shutdown_grace_s,
            [list(commands)],
            lambda: log.info("gateway workers ready", workers=config.gateway_workers),
            lambda error: log.error("gateway workers did not start", error=repr(error)),
        )
        return await run_children(commands, _until_ready(run_dir / "slots"), supervision)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
