"""Gateway and tokenizer workers without processes: the whole-server
request count, the tokenizer pool's routing, and the command lines that
serve and a supervising gateway give their workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pagewire.services.common.config import default_workers, parse_config
from pagewire.services.gateway.admission import SharedCount, create_slots, workers_ready
from pagewire.services.gateway.config import GatewayConfig
from pagewire.services.gateway.connection import Backoff
from pagewire.services.gateway.tokenizers import TokenizerPool
from pagewire.services.gateway.workers import MULTIPROC_ENV, SLOTS_ENV, WORKER_ENV, worker_commands
from pagewire.services.launcher import CONFIG, child_commands
from pagewire.v1 import tokenizer_pb2


def test_the_bound_counts_every_workers_requests(tmp_path: Path) -> None:
    create_slots(tmp_path / "slots", 2)
    first, second = SharedCount(tmp_path / "slots", 0), SharedCount(tmp_path / "slots", 1)
    assert first.acquire(3) and second.acquire(3) and second.acquire(3)
    assert not first.acquire(3) and not second.acquire(3)
    second.release()
    assert first.acquire(3)
    assert first.in_flight() == second.in_flight() == 3


def test_a_worker_started_again_drops_what_its_dead_predecessor_counted(tmp_path: Path) -> None:
    create_slots(tmp_path / "slots", 2)
    dead = SharedCount(tmp_path / "slots", 1)
    assert dead.acquire(2) and dead.acquire(2)
    dead.close()
    again = SharedCount(tmp_path / "slots", 1)
    assert again.in_flight() == 0 and again.acquire(2)


def test_the_server_is_ready_once_every_worker_has_been(tmp_path: Path) -> None:
    create_slots(tmp_path / "slots", 2)
    first, second = SharedCount(tmp_path / "slots", 0), SharedCount(tmp_path / "slots", 1)
    first.mark_ready()
    assert not workers_ready(tmp_path / "slots") and not first.all_ready_once()
    second.mark_ready()
    assert workers_ready(tmp_path / "slots")
    # A worker started again does not make the server unready.
    assert SharedCount(tmp_path / "slots", 0).all_ready_once()


def test_default_workers_follow_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    for cores, workers in [(1, 1), (2, 1), (4, 1), (8, 2), (16, 4), (64, 8)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, cores=cores: set(range(cores)))
        assert default_workers() == workers


class FakeClient:
    """A connected tokenizer worker that keeps what it is sent."""

    available = True
    pending_tokenize = 0

    def __init__(self, address: str):
        self.address = address
        self.items: list[tokenizer_pb2.DetokenizeItem] = []

    def detokenize(self, items: list[tokenizer_pb2.DetokenizeItem]) -> None:
        self.items.extend(items)

    def send_detokenize(self, batch: tokenizer_pb2.DetokenizeBatch) -> None:
        self.items.extend(batch.items)


def _pool(workers: int) -> tuple[TokenizerPool, list[FakeClient]]:
    downs: list[tuple[object, str]] = []
    pool = TokenizerPool([f"t{i}" for i in range(workers)], [], Backoff(0.1, 0.1), 0.1, 1 << 20, lambda delta: None, lambda client, reason: downs.append((client, reason)))
    fakes = [FakeClient(f"t{i}") for i in range(workers)]
    pool.clients = fakes  # type: ignore[assignment]
    pool._load = dict.fromkeys(fakes, 0)  # type: ignore[arg-type]
    return pool, fakes


def test_requests_spread_over_tokenizer_workers_and_each_stays_on_its_own() -> None:
    pool, (first, second) = _pool(2)
    for request_id in ("a", "b", "c", "d"):
        pool.detokenize([tokenizer_pb2.DetokenizeItem(request_id=request_id, start=tokenizer_pb2.DetokenizeStart())])
    assert [item.request_id for item in first.items] == ["a", "c"] and [item.request_id for item in second.items] == ["b", "d"]

    step = tokenizer_pb2.DetokenizeBatch()
    for request_id in ("a", "b", "c", "d"):
        step.items.add(request_id=request_id).append.token_ids.append(7)
    pool.send_detokenize(step)
    assert [item.request_id for item in first.items[2:]] == ["a", "c"] and [item.request_id for item in second.items[2:]] == ["b", "d"]

    # A cancel goes where the request decodes, and frees that worker for the next start.
    pool.detokenize([tokenizer_pb2.DetokenizeItem(request_id="a", cancel=True), tokenizer_pb2.DetokenizeItem(request_id="c", cancel=True)])
    assert [item.request_id for item in first.items[4:]] == ["a", "c"]
    pool.detokenize([tokenizer_pb2.DetokenizeItem(request_id="e", start=tokenizer_pb2.DetokenizeStart())])
    assert first.items[-1].request_id == "e" and pool.assigned("e") is first


def test_a_tokenizer_worker_that_goes_down_releases_only_its_requests() -> None:
    pool, (first, second) = _pool(2)
    for request_id in ("a", "b"):
        pool.detokenize([tokenizer_pb2.DetokenizeItem(request_id=request_id, start=tokenizer_pb2.DetokenizeStart())])
    pool._down(first, "gone")  # type: ignore[arg-type]
    assert pool.assigned("a") is None and pool.assigned("b") is second


def test_serve_runs_tokenizer_workers_on_consecutive_ports_and_tells_the_gateway() -> None:
    config = parse_config(CONFIG, ["--tokenizer-port", "7100", "--tokenizer-workers", "3", "--gateway-workers", "2"])
    commands = child_commands(config)
    assert list(commands) == ["tokenizer-0", "tokenizer-1", "tokenizer-2", "engine", "gateway"]
    for index in range(3):
        argv = commands[f"tokenizer-{index}"].argv
        assert argv[argv.index("--port") + 1] == str(7100 + index)
    gateway = " ".join(commands["gateway"].argv)
    assert "--tokenizer 127.0.0.1:7100 --tokenizer 127.0.0.1:7101 --tokenizer 127.0.0.1:7102" in gateway
    assert "--gateway-workers 2" in gateway


def test_gateway_workers_get_the_whole_config_and_their_place(tmp_path: Path) -> None:
    config = parse_config(GatewayConfig, ["--gateway-workers", "2", "--api-key", "sk-secret", "--port", "7001"])
    commands = worker_commands(config, tmp_path)
    assert list(commands) == ["gateway-0", "gateway-1"]
    for index, command in enumerate(commands.values()):
        assert command.argv[:4] == [sys.executable, "-m", "pagewire.services.cli", "gateway"]
        assert "sk-secret" not in " ".join(command.argv) and command.env["PAGEWIRE_API_KEY"] == "sk-secret"
        assert command.env[WORKER_ENV] == str(index) and command.env[SLOTS_ENV] == str(tmp_path / "slots")
        assert command.env[MULTIPROC_ENV] == str(tmp_path / "metrics")
        assert "--port 7001" in " ".join(command.argv)


def test_a_workers_readiness_check_reads_the_shared_state_at_the_call(tmp_path: Path) -> None:
    """A worker whose stored readiness lags (its poll has not run since the
    last peer became ready) answers SERVING as soon as every worker has been
    ready, and NOT_SERVING again once it drains."""
    import asyncio

    from pagewire.services.common.grpc_utils import check_health, start_server
    from pagewire.services.gateway.server import SharedPortHealth

    create_slots(tmp_path / "slots", 2)
    this, peer = SharedCount(tmp_path / "slots", 0), SharedCount(tmp_path / "slots", 1)
    gateway_ready = [True]
    service = "pagewire.v1.Generation"

    async def scenario() -> list[bool]:
        health = SharedPortHealth(service, lambda: gateway_ready[0] and this.all_ready_once())
        running = await start_server("127.0.0.1", 0, 1 << 20, [], [service], health=health)
        target = f"127.0.0.1:{running.port}"

        async def probe() -> bool:
            return await asyncio.to_thread(check_health, target, service)

        seen = [await probe()]  # neither worker ready
        this.mark_ready()
        seen.append(await probe())  # the peer not yet
        peer.mark_ready()
        seen.append(await probe())  # both: the stored status still says NOT_SERVING
        gateway_ready[0] = False
        seen.append(await probe())  # this worker lost its peers
        gateway_ready[0] = True
        await health.enter_graceful_shutdown()
        seen.append(await probe())
        await running.server.stop(0)
        return seen

    assert asyncio.run(scenario()) == [False, False, True, False, False]
