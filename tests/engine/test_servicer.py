"""The Engine gRPC service, through a real in-process server on a free port."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pagewire.services.common.grpc_utils import check_health
from pagewire.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.model_executor import create_engine_core
from pagewire.services.engine.service.server import attach_core, start_engine_server
from pagewire.services.engine.core.step_loop import StepLoop
from pagewire.services.engine.service.servicer import SERVICE_NAME, sampling_from_proto
from pagewire.services.engine.core.sequence import SamplingParams
from tests.support.harness import free_port
from tests.engine.util import MAX_NEW_TOKENS, assert_no_leaks

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


class EngineServerThread:
    """An engine server on its own event loop in a background thread."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.config = EngineConfig(port=free_port())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running, self.servicer = self._call(start_engine_server(self.config))
        # The step loop in this process: the core process is tested in test_core_process.py.
        step_loop = StepLoop(core)
        step_loop.start()
        self._call(attach_core(self.running, self.servicer, step_loop))
        self.target = f"127.0.0.1:{self.running.port}"

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def stop(self) -> None:
        self._call(self.running.server.stop(None))
        self.servicer.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(engine_model) -> Iterator[EngineServerThread]:
    core = create_engine_core(EngineConfig(num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=64), engine_model)
    running = EngineServerThread(core)
    yield running
    running.stop()


@pytest.fixture
def stub(server) -> Iterator[engine_pb2_grpc.EngineStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield engine_pb2_grpc.EngineStub(channel)


def _add(request_id: str, ids: list[int], **sampling) -> engine_pb2.AddRequest:
    params = {"temperature": 0.0, "max_tokens": MAX_NEW_TOKENS} | sampling
    return engine_pb2.AddRequest(request_id=request_id, prompt_token_ids=ids, sampling=common_pb2.SamplingParams(**params))


def _updates_by_id(steps: list[engine_pb2.EngineStep]) -> dict[str, list[engine_pb2.SequenceUpdate]]:
    by_id: dict[str, list[engine_pb2.SequenceUpdate]] = {}
    for step in steps:
        for update in step.updates:
            by_id.setdefault(update.request_id, []).append(update)
    return by_id


def _wait_idle(core: EngineCore, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while core.has_unfinished() or core.kv_cache.pool.num_free != core.kv_cache.num_blocks:
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.05)


def _tokens(updates: list[engine_pb2.SequenceUpdate]) -> list[int]:
    return [t for u in updates for t in u.token_ids]


class Inputs:
    """A request stream the test feeds while reading responses."""

    def __init__(self) -> None:
        self.messages: queue.Queue[engine_pb2.EngineInput | None] = queue.Queue()

    def send(self, **fields) -> None:
        self.messages.put(engine_pb2.EngineInput(**fields))

    def close(self) -> None:
        self.messages.put(None)

    def __iter__(self) -> Iterator[engine_pb2.EngineInput]:
        while (message := self.messages.get()) is not None:
            yield message


def test_bad_requests_get_invalid_argument_and_leave_others_alone(server, stub, prompts, hf_greedy) -> None:
    adds = [
        _add("good", prompts[0]),
        _add("empty", []),
        _add("out-of-vocab", [1, 2, 99999]),
        _add("cold", prompts[0], temperature=-1.0),
        _add("many", prompts[0], n=2),
        _add("too-many-logprobs", prompts[0], logprobs=21),
        _add("good", prompts[1]),  # reused while live
        _add("", prompts[0]),
    ]
    steps = list(stub.Generate(iter([engine_pb2.EngineInput(add=adds)]), timeout=120))
    by_id = _updates_by_id(steps)
    good = by_id.pop("good")
    refused_duplicate = [u for u in good if u.error.code]
    assert len(refused_duplicate) == 1
    _assert_refused(refused_duplicate[0], "already live", ends_request=False)
    good = [u for u in good if not u.error.code]
    assert _tokens(good) == hf_greedy[0]
    assert good[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert good[0].num_prompt_tokens == len(prompts[0]) and good[0].HasField("queue_time_s")
    hints = {"empty": "empty", "out-of-vocab": "vocabulary", "cold": "temperature", "many": "n must be 1", "too-many-logprobs": "logprobs", "": "request_id"}
    assert set(by_id) == set(hints)
    for request_id, hint in hints.items():
        (update,) = by_id[request_id]
        _assert_refused(update, hint)
    for step in steps:
        ids = [u.request_id for u in step.updates if not u.error.code]
        assert len(ids) == len(set(ids)), "one update per request per step"
    _wait_idle(server.core)
    assert_no_leaks(server.core)


def test_bad_adds_while_a_request_decodes_leave_it_alone(server, stub, prompts, hf_greedy) -> None:
    hints = {
        "empty": "prompt_token_ids is empty",
        "out-of-vocab": "outside the vocabulary [0, 49152)",
        "no-tokens": "max_tokens must be >= 1",
        "too-long": "max_model_len",
        "top-p-zero": "top_p must be in (0, 1]",
        "nan-penalty": "repetition_penalty must be a finite number",
        "good": "already live on this stream; the earlier request continues",
    }
    bad = [
        _add("empty", []),
        _add("out-of-vocab", [1, 2, 49152]),
        _add("no-tokens", prompts[1], max_tokens=0),
        _add("too-long", [1] * server.core.max_model_len),
        _add("top-p-zero", prompts[1], temperature=1.0, top_p=0.0),
        _add("nan-penalty", prompts[1], repetition_penalty=float("nan")),
        _add("good", prompts[1]),
    ]
    inputs = Inputs()
    inputs.send(add=[_add("good", prompts[0])])
    steps = []
    for step in stub.Generate(iter(inputs), timeout=120):
        steps.append(step)
        if len(steps) == 1:
            # The good request is past prefill and decoding when the bad ones arrive.
            (first,) = step.updates
            assert first.request_id == "good" and len(first.token_ids) == 1 and not first.finish_reason
            inputs.send(add=bad)
            inputs.close()
    refusals = {u.request_id: (index, u) for index, step in enumerate(steps) for u in step.updates if u.error.code}
    assert set(refusals) == set(hints)
    for request_id, hint in hints.items():
        _assert_refused(refusals[request_id][1], hint, ends_request=request_id != "good")
    good = [(index, u) for index, step in enumerate(steps) for u in step.updates if u.request_id == "good" and not u.error.code]
    assert _tokens([u for _, u in good]) == hf_greedy[0]
    assert [u.finish_reason for _, u in good] == [0] * (len(good) - 1) + [common_pb2.FINISH_REASON_LENGTH]
    # It was still running when every refusal went out.
    assert max(index for index, _ in refusals.values()) < good[-1][0]
    _wait_idle(server.core)
    stats = stub.Stats(engine_pb2.EngineStatsRequest())
    assert stats.num_free_blocks == stats.num_total_blocks and stats.load.num_running == stats.load.num_waiting == 0
    assert_no_leaks(server.core)


def _assert_refused(update: engine_pb2.SequenceUpdate, hint: str, *, ends_request: bool = True) -> None:
    assert update.error.code == INVALID_ARGUMENT and hint in update.error.message, update.error.message
    # A refused duplicate id does not end the live request of that id.
    expected = common_pb2.FINISH_REASON_ERROR if ends_request else common_pb2.FINISH_REASON_UNSPECIFIED
    assert update.finish_reason == expected and not update.token_ids


def test_stream_of_only_bad_requests_gets_its_errors_before_it_ends(stub) -> None:
    steps = list(stub.Generate(iter([engine_pb2.EngineInput(add=[_add("bad", [])])]), timeout=30))
    (update,) = [u for step in steps for u in step.updates]
    assert update.request_id == "bad" and update.error.code == INVALID_ARGUMENT


def test_abort_and_unknown_abort_on_a_live_stream(server, stub, prompts, hf_greedy) -> None:
    inputs = Inputs()
    inputs.send(add=[_add("keep", prompts[0]), _add("stop-me", prompts[1], max_tokens=200, ignore_eos=True)])
    steps = []
    for step in stub.Generate(iter(inputs), timeout=120):
        steps.append(step)
        if len(steps) == 2:
            inputs.send(abort=["stop-me", "never-sent"])
            inputs.close()
    by_id = _updates_by_id(steps)
    assert by_id["stop-me"][-1].finish_reason == common_pb2.FINISH_REASON_CANCELLED
    assert len(_tokens(by_id["stop-me"])) < 200
    assert _tokens(by_id["keep"]) == hf_greedy[0]
    assert "never-sent" not in by_id
    _wait_idle(server.core)
    assert_no_leaks(server.core)


def test_disconnect_aborts_the_streams_requests_only(server, prompts, hf_greedy) -> None:
    with grpc.insecure_channel(server.target) as first, grpc.insecure_channel(server.target) as second:
        dropped_inputs, kept_inputs = Inputs(), Inputs()
        dropped = engine_pb2_grpc.EngineStub(first).Generate(iter(dropped_inputs), timeout=120)
        kept = engine_pb2_grpc.EngineStub(second).Generate(iter(kept_inputs), timeout=120)
        dropped_inputs.send(add=[_add("long", prompts[2], max_tokens=300, ignore_eos=True), _add("waiting", prompts[3], max_tokens=300)])
        kept_inputs.send(add=[_add("long", prompts[0])])  # same id on another stream is fine
        next(dropped)
        dropped.cancel()
        kept_inputs.close()
        kept_steps = list(kept)
    by_id = _updates_by_id(kept_steps)
    assert set(by_id) == {"long"}
    assert _tokens(by_id["long"]) == hf_greedy[0]
    _wait_idle(server.core)
    assert_no_leaks(server.core)


def test_timeout_finishes_with_time_limit(server, stub, prompts) -> None:
    add = _add("slow", prompts[0], max_tokens=400, ignore_eos=True)
    add.timeout.CopyFrom(Duration(nanos=200_000_000))
    steps = list(stub.Generate(iter([engine_pb2.EngineInput(add=[add])]), timeout=120))
    updates = _updates_by_id(steps)["slow"]
    assert updates[-1].finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT
    assert len(_tokens(updates)) < 400


def test_logprobs_and_stop_token_travel_in_the_update(server, stub, prompts, hf_greedy) -> None:
    stop = hf_greedy[0][1]
    add = _add("lp", prompts[0], logprobs=3, stop_token_ids=[stop])
    steps = list(stub.Generate(iter([engine_pb2.EngineInput(add=[add])]), timeout=60))
    updates = _updates_by_id(steps)["lp"]
    assert _tokens(updates) == hf_greedy[0][:2]
    assert updates[-1].finish_reason == common_pb2.FINISH_REASON_STOP and updates[-1].matched_stop_token_id == stop
    logprobs = [lp for u in updates for lp in u.logprobs]
    assert [lp.token_id for lp in logprobs] == hf_greedy[0][:2]
    assert all(len(lp.top_logprobs) == 3 and lp.top_logprobs[0].token_id == lp.token_id for lp in logprobs)
    assert all(lp.logprob <= 0 for lp in logprobs)
    assert all(step.HasField("load") for step in steps)


def test_info_stats_health_and_reflection(server, stub) -> None:
    info = stub.Info(engine_pb2.EngineInfoRequest())
    assert info.model_id == "SmolLM2-135M-Instruct" and info.vocab_size == 49152 and list(info.eos_token_ids) == [2]
    assert (info.num_kv_blocks, info.max_model_len, info.block_size, info.max_num_batched_tokens) == (128, 512, 16, 64)
    assert info.device == "cpu" and info.dtype == "float32" and info.prefix_caching
    assert (info.kv_cache_dtype, info.quantization) == ("float32", "none")
    stats = stub.Stats(engine_pb2.EngineStatsRequest())
    assert stats.num_total_blocks == 128 and stats.num_free_blocks <= 128
    assert check_health(server.target, SERVICE_NAME)
    with grpc.insecure_channel(server.target) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert SERVICE_NAME in {s.name for s in answer.list_services_response.service}


def test_sampling_conversion_keeps_unset_defaults_and_explicit_zero_temperature() -> None:
    assert sampling_from_proto(common_pb2.SamplingParams()) == SamplingParams()
    converted = sampling_from_proto(common_pb2.SamplingParams(temperature=0.0, top_k=5, seed=9, stop_token_ids=[4, 5], logprobs=0))
    assert converted.greedy and converted.top_k == 5 and converted.seed == 9
    assert converted.stop_token_ids == (4, 5) and converted.logprobs == 0 and converted.max_tokens is None
