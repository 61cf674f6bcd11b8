"""A gateway process over two engine replicas: spreading load, a replica
lost mid-stream (its requests fail with UNAVAILABLE, the others go on) and
coming back, a draining replica, prefix-affinity routing. The replicas are
scripted engines (tests/gateway/scripted_engine.py) so that they can be
killed and restarted cheaply; the tokenizer is the real service."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from pagewire.services.common.grpc_utils import RunningServer
from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from pagewire.services.tokenizer.server import TokenizerConfig, start
from tests.gateway.bidi_stream import BidiStream
from tests.gateway.scripted_engine import ScriptedEngine, start_scripted_engine
from tests.support.harness import ServiceProcess, free_port, wait_until

T = TypeVar("T")
STEP_S = 0.02
WAIT_S = 30.0


class PeerLoop:
    """The tokenizer and scripted engines, served by an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(WAIT_S)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)


@dataclass
class Replica:
    engine: ScriptedEngine
    port: int
    server: RunningServer | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Cluster:
    peers: PeerLoop
    tokenizer_port: int
    replicas: list[Replica]
    log_dir: Path

    def start_replica(self, replica: Replica) -> None:
        replica.server = self.peers.run(start_scripted_engine(replica.engine, replica.port))

    def stop_replica(self, replica: Replica) -> None:
        assert replica.server is not None
        self.peers.run(replica.server.server.stop(None))
        replica.server = None

    def set_serving(self, replica: Replica, serving: bool) -> None:
        assert replica.server is not None
        self.peers.run(replica.server.set_serving(serving))

    def gateway(self, *flags: str) -> Iterator[str]:
        """A gateway process over both replicas; yields its gRPC address."""
        engines = [part for replica in self.replicas for part in ("--engine", replica.address)]
        gateway = ServiceProcess(
            "gateway",
            ["--tokenizer", f"127.0.0.1:{self.tokenizer_port}", *engines, "--reconnect-initial-s", "0.05", "--reconnect-max-s", "0.2", *flags],
            log_path=self.log_dir / "gateway.log",
        )
        with gateway.running():
            yield gateway.address


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    peers = PeerLoop()
    tokenizer_port = free_port()
    tokenizer = peers.run(start(TokenizerConfig(port=tokenizer_port)))
    replicas = sorted((Replica(ScriptedEngine("scripted", STEP_S), free_port()) for _ in range(2)), key=lambda r: r.address)
    cluster = Cluster(peers, tokenizer_port, replicas, tmp_path_factory.mktemp("replicas"))
    try:
        for replica in replicas:
            cluster.start_replica(replica)
        yield cluster
    finally:
        for replica in replicas:
            if replica.server is not None:
                cluster.stop_replica(replica)
        peers.run(tokenizer.server.stop(None))
        peers.close()


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[gateway_pb2_grpc.GenerationStub]:
    for target in cluster.gateway():
        with grpc.insecure_channel(target) as channel:
            yield gateway_pb2_grpc.GenerationStub(channel)


def complete(stub: gateway_pb2_grpc.GenerationStub, text: str, max_tokens: int = 3) -> list[gateway_pb2.GenerateChunk]:
    return list(stub.Complete(gateway_pb2.GenerateRequest(text=text, sampling=common_pb2.SamplingParams(max_tokens=max_tokens)), timeout=WAIT_S))


def added(replica: Replica) -> int:
    return len(replica.engine.record.added)


def test_a_lost_replica_fails_only_its_requests_and_is_used_again_when_back(cluster: Cluster, stub: gateway_pb2_grpc.GenerationStub) -> None:
    lost, survivor = cluster.replicas
    before = [added(r) for r in cluster.replicas]
    stream = BidiStream(stub)
    for i in range(8):
        stream.start(gateway_pb2.GenerateRequest(request_id=f"r{i}", text=f"Request number {i} goes here", sampling=common_pb2.SamplingParams(max_tokens=60)))
    finals: dict[str, gateway_pb2.GenerateChunk] = {}
    started: set[str] = set()
    on_lost: set[str] = set()
    for chunk in stream.chunks():
        started.add(chunk.request_id)
        if len(started) == 8 and lost.server is not None:
            # Least-loaded spread them: four each.
            assert [added(r) - b for r, b in zip(cluster.replicas, before)] == [4, 4]
            on_lost = set(lost.engine.running)
            cluster.stop_replica(lost)
        if chunk.finish_reason:
            finals[chunk.request_id] = chunk
            if len(finals) == 8:
                stream.close()
    failed = {rid for rid, chunk in finals.items() if chunk.finish_reason == common_pb2.FINISH_REASON_ERROR}
    assert len(failed) == len(on_lost) == 4
    for request_id in failed:
        assert finals[request_id].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert lost.address in finals[request_id].error.message
    for request_id in set(finals) - failed:
        assert finals[request_id].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert finals[request_id].usage.completion_tokens == 60

    # Out of rotation: every new request goes to the survivor.
    survivor_before = added(survivor)
    for i in range(3):
        assert complete(stub, f"While one is away {i}")[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert added(survivor) == survivor_before + 3

    cluster.start_replica(lost)
    lost_before = added(lost)
    wait_until(lambda: complete(stub, "Anyone back?") and added(lost) > lost_before, "the returned replica gets requests again", WAIT_S)


def test_a_draining_replica_finishes_its_requests_gets_no_new_ones_and_is_let_go(cluster: Cluster, stub: gateway_pb2_grpc.GenerationStub) -> None:
    draining, other = cluster.replicas
    wait_until(lambda: draining.engine.open_streams == 1 and other.engine.open_streams == 1, "both replicas are connected", WAIT_S)
    stream = BidiStream(stub)
    stream.start(gateway_pb2.GenerateRequest(request_id="long", text="A long answer, please", sampling=common_pb2.SamplingParams(max_tokens=40)))
    stream.start(gateway_pb2.GenerateRequest(request_id="long-2", text="Another long answer", sampling=common_pb2.SamplingParams(max_tokens=40)))
    chunks = stream.chunks()
    next(chunks)
    assert draining.engine.running and other.engine.running
    cluster.set_serving(draining, False)
    other_before = added(other)
    time.sleep(0.2)  # the health watch reaches the gateway
    for i in range(3):
        complete(stub, f"During the drain {i}")
    assert added(other) == other_before + 3
    finals = []
    for chunk in chunks:
        if chunk.finish_reason:
            finals.append(chunk)
            if len(finals) == 2:
                stream.close()
    assert all(f.finish_reason == common_pb2.FINISH_REASON_LENGTH and f.usage.completion_tokens == 40 for f in finals), finals
    # Nothing of the gateway's left there: its stream closes, so the replica may stop.
    wait_until(lambda: draining.engine.open_streams == 0, "the gateway closes its stream to the draining replica", WAIT_S)

    cluster.set_serving(draining, True)
    wait_until(lambda: draining.engine.open_streams == 1, "the gateway reconnects once the replica serves again", WAIT_S)


def test_requests_the_engine_refuses_leave_no_load_behind_and_do_not_hold_up_a_drain(cluster: Cluster, stub: gateway_pb2_grpc.GenerationStub) -> None:
    refusing, other = cluster.replicas
    wait_until(lambda: refusing.engine.open_streams == 1 and other.engine.open_streams == 1, "both replicas are connected", WAIT_S)
    # With the other replica out of rotation, three requests go to `refusing`,
    # which refuses their out-of-vocabulary id. It comes first, out of the
    # prompt tail the detokenizer gets, so that the refusal is the engine's.
    cluster.set_serving(other, False)
    wait_until(lambda: other.engine.open_streams == 0, "the gateway lets the idle draining replica go", WAIT_S)
    for _ in range(3):
        refused = stub.Complete(gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[4_000_000, *range(1, 17)])), timeout=WAIT_S)
        with pytest.raises(grpc.RpcError) as raised:
            list(refused)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in (raised.value.details() or "")
    cluster.set_serving(other, True)
    wait_until(lambda: other.engine.open_streams == 1, "the gateway reconnects to the replica back in rotation", WAIT_S)

    # Nothing of the refused requests counts as load: least-loaded spreads evenly.
    before = [added(r) for r in cluster.replicas]
    stream = BidiStream(stub)
    for i in range(8):
        stream.start(gateway_pb2.GenerateRequest(request_id=f"even-{i}", text=f"Spread number {i}", sampling=common_pb2.SamplingParams(max_tokens=4)))
    finals = 0
    for chunk in stream.chunks():
        finals += bool(chunk.finish_reason)
        if finals == 8:
            stream.close()
    assert [added(r) - b for r, b in zip(cluster.replicas, before)] == [4, 4]

    # Nor does it hold up a drain: the stream to the draining replica closes.
    cluster.set_serving(refusing, False)
    wait_until(lambda: refusing.engine.open_streams == 0, "the gateway lets the draining replica go", WAIT_S)
    cluster.set_serving(refusing, True)
    wait_until(lambda: refusing.engine.open_streams == 1, "the gateway reconnects once the replica serves again", WAIT_S)


def test_a_stop_string_ends_the_output_at_the_token_that_completed_it(cluster: Cluster, stub: gateway_pb2_grpc.GenerationStub) -> None:
    text = "one two three four five six seven eight nine ten"

    def run(**options: Any) -> tuple[list[gateway_pb2.GenerateChunk], list[int]]:
        request = gateway_pb2.GenerateRequest(text=text, sampling=common_pb2.SamplingParams(max_tokens=16), **options)
        chunks = list(stub.Complete(request, timeout=WAIT_S))
        return chunks, [token_id for chunk in chunks for token_id in chunk.token_ids]

    # Eight tokens per update: the engine is ahead of the detokenizer when the stop string matches.
    for replica in cluster.replicas:
        replica.engine.tokens_per_step = 8
    try:
        _, free = run()
        for with_stop_text in (False, True):
            chunks, ids = run(stop=[" three"], include_stop_str_in_output=with_stop_text)
            assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP and chunks[-1].matched_stop == " three"
            # The scripted model repeats the prompt: "one", " two", " three" completes the stop string.
            assert ids == free[:3] and chunks[-1].usage.completion_tokens == 3, chunks
            assert "".join(chunk.text for chunk in chunks).endswith("one two" + (" three" if with_stop_text else ""))
    finally:
        for replica in cluster.replicas:
            replica.engine.tokens_per_step = 1


def test_prefix_affinity_keeps_a_shared_prefix_on_one_replica(cluster: Cluster) -> None:
    shared = "You are a helpful assistant who answers every question about the weather in great detail. "
    for target in cluster.gateway("--routing", "prefix-affinity"):
        with grpc.insecure_channel(target) as channel:
            stub = gateway_pb2_grpc.GenerationStub(channel)
            before = [added(r) for r in cluster.replicas]
            for i in range(6):
                complete(stub, shared + f"Question {i}: will it rain?", max_tokens=1)
            counts = [added(r) - b for r, b in zip(cluster.replicas, before)]
            assert sorted(counts) == [0, 6], counts

            before = [added(r) for r in cluster.replicas]
            for i in range(12):
                complete(stub, f"Topic {i} " * 12, max_tokens=1)
            counts = [added(r) - b for r, b in zip(cluster.replicas, before)]
            assert all(count > 0 for count in counts), counts
