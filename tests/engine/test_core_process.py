"""The engine core in its own process (what `pagewire engine` runs): commands
cross the pipe, every step's batch comes back, stats answer, and a core that
dies or cannot load says so instead of leaving streams waiting."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import queue
import signal
import threading
from multiprocessing.reduction import ForkingPickler

import pytest
from pagewire.services.common.errors import Refusal, RequestError
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineLoad
from pagewire.services.engine.core.sequence import (
    FinishReason,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from pagewire.services.engine.core.step_loop import (
    PLAIN_OUTPUT_FIELDS,
    AbortCommand,
    AddCommand,
    StreamBatch,
    StreamCommand,
    StreamState,
)
from pagewire.services.engine.service.core_process import CoreProcess, CoreProcessError
from pagewire.services.engine.service.servicer import update_from_error, update_from_output

from tests.engine.util import MAX_NEW_TOKENS

CONFIG = EngineConfig(num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=64)
WAIT_S = 60.0


class Stream:
    """One stream's deliveries, as the servicer would receive them."""

    def __init__(self, core: CoreProcess, stream_id: int) -> None:
        self.core = core
        self.batches: queue.Queue[StreamBatch | None] = queue.Queue()
        self.state = StreamState(stream_id, self.batches.put)
        core.submit(StreamCommand("open", self.state))

    def add(self, request_id: str, ids: list[int], max_tokens: int = MAX_NEW_TOKENS) -> None:
        self.core.submit(AddCommand(self.state.stream_id, request_id, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens), None))

    def next_batch(self) -> StreamBatch | None:
        return self.batches.get(timeout=WAIT_S)

    def collect_until_finished(self, request_ids: set[str]) -> dict[str, list]:  # type: ignore[type-arg]
        outputs: dict[str, list] = {}  # type: ignore[type-arg]
        unfinished = set(request_ids)
        while unfinished:
            batch = self.next_batch()
            assert batch is not None, "the stream ended early"
            for request_id, output in batch.items():
                outputs.setdefault(request_id, []).append(output)
                if isinstance(output, RequestError) or output.finished:
                    unfinished.discard(request_id)
        return outputs


@pytest.fixture
def core() -> CoreProcess:
    process = CoreProcess(CONFIG)
    process.start()
    yield process
    process.stop()


def test_generates_hf_greedy_over_the_pipe_and_frees_every_block(core: CoreProcess, prompts, hf_greedy) -> None:
    assert core.info.max_model_len == 512 and core.info.num_kv_blocks == 128
    stream = Stream(core, stream_id=7)
    for index, ids in enumerate(prompts[:4]):
        stream.add(f"r{index}", ids)
    outputs = stream.collect_until_finished({f"r{index}" for index in range(4)})
    for index in range(4):
        assert [t for out in outputs[f"r{index}"] for t in out.new_token_ids] == hf_greedy[index]
        assert outputs[f"r{index}"][-1].finish_reason is FinishReason.LENGTH

    # Abort mid-way, and a refusal that travels back as a RequestError.
    stream.add("long", prompts[0], max_tokens=400)
    assert stream.next_batch() is not None
    core.submit(AbortCommand(7, "long"))
    stream.add("empty", [])
    outputs = stream.collect_until_finished({"long", "empty"})
    assert outputs["long"][-1].finish_reason is FinishReason.CANCELLED
    (refusal,) = outputs["empty"]
    assert refusal.kind is Refusal.INVALID_ARGUMENT and "empty" in refusal.message

    core.submit(StreamCommand("input_done", stream.state))
    while (batch := stream.next_batch()) is not None:
        assert not list(batch.items())
    stats = asyncio.run(core.stats())
    assert stats.num_free_blocks == stats.num_total_blocks == 128
    assert stats.load.num_running == stats.load.num_waiting == 0
    assert stats.generation_tokens_total >= 4 * MAX_NEW_TOKENS


def test_a_killed_core_ends_its_streams_and_says_why() -> None:
    lost = threading.Event()
    core = CoreProcess(CONFIG, on_lost=lost.set)
    core.start()
    try:
        stream = Stream(core, stream_id=1)
        stream.add("doomed", [1, 2, 3], max_tokens=400)
        assert stream.next_batch() is not None
        os.kill(core.process.pid, signal.SIGKILL)
        while stream.next_batch() is not None:
            pass  # updates already on their way, then the end
        assert lost.wait(WAIT_S)
        assert isinstance(core.error, CoreProcessError) and "code -9" in str(core.error)
        with pytest.raises(CoreProcessError):
            asyncio.run(core.stats())
        with pytest.raises(CoreProcessError, match="gone"):
            stream.add("after", [1, 2, 3])
    finally:
        core.stop()


def test_a_core_that_cannot_load_says_why() -> None:
    core = CoreProcess(EngineConfig(num_kv_blocks=0))
    with pytest.raises(CoreProcessError, match="num-kv-blocks must be at least 1"):
        core.start()
    assert not core.process.is_alive()


def test_a_batch_crosses_the_pipe_whole() -> None:
    # Plain one-token updates travel as flat lists, the rest as they are: all come back equal, each request's in order.
    updates: list[tuple[str, RequestOutput | RequestError]] = [
        ("dup", RequestError(Refusal.INVALID_ARGUMENT, "request id 'dup' is already live")),
        ("a", RequestOutput("1/0", [5])),
        ("dup", RequestOutput("1/1", [6])),
        ("first", RequestOutput("1/2", [7], num_prompt_tokens=12, num_cached_tokens=0, queue_time_s=0.01)),
        ("end", RequestOutput("1/3", [2], finish_reason=FinishReason.STOP, matched_stop_token_id=2)),
        ("lp", RequestOutput("1/4", [9], logprobs=[TokenLogprob(9, -0.5, ((9, -0.5), (3, -1.0)))])),
        ("spec", RequestOutput("1/5", [1, 2, 3])),
        ("cut", RequestOutput("1/6", [], finish_reason=FinishReason.CANCELLED)),
        ("b", RequestOutput("1/7", [0])),
    ]
    batch = StreamBatch(EngineLoad(num_running=7, num_waiting=1, kv_cache_usage=0.25))
    for rid, item in updates:
        batch.add(rid, item)
    back = pickle.loads(ForkingPickler.dumps(batch))
    assert back.plain_ids == ["a", "dup", "b"]
    assert back.load == batch.load

    def sent(update: tuple[str, RequestOutput | RequestError]) -> bytes:
        rid, item = update
        proto = update_from_output(rid, item) if isinstance(item, RequestOutput) else update_from_error(rid, item)
        return proto.SerializeToString(deterministic=True)

    # The servicer sends the same updates, each request's in its order.
    assert sorted(map(sent, back.items())) == sorted(map(sent, updates))
    assert [sent(u) for u in back.items() if u[0] == "dup"] == [sent(updates[0]), sent(updates[2])]


def test_the_pipe_knows_every_field_of_an_output() -> None:
    # A field RequestOutput gains must be checked before an update can travel as a bare token.
    assert tuple(f.name for f in dataclasses.fields(RequestOutput)) == PLAIN_OUTPUT_FIELDS
