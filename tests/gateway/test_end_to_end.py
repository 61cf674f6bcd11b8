"""`pagewire serve` on the embedded model, as real processes on real ports:
OpenAI clients over REST, gRPC clients over the bidi stream and Complete,
bad input, cancellation and deadlines reaching the engine, metrics,
reflection."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import psutil
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from pagewire.v1 import common_pb2, engine_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.bidi_stream import BidiStream
from tests.support.harness import ServeProcess, engine_stats

MAX_MODEL_LEN = 512
MAX_MESSAGE_BYTES = 1 << 20
MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
CHAT_MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    serve = ServeProcess(
        ["--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "256", "--max-message-bytes", str(MAX_MESSAGE_BYTES)],
        log_path=tmp_path_factory.mktemp("serve") / "serve.log",
    )
    with serve.running():
        yield serve
    assert serve.process is not None and serve.process.returncode == 0, serve.log_tail()
    assert serve.events("stopped")[-1]["exit_code"] == 0


@pytest.fixture(scope="module")
def openai_client(server: ServeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.rest_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def stub(server: ServeProcess) -> Iterator[gateway_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield gateway_pb2_grpc.GenerationStub(channel)


def wait_engine_idle(server: ServeProcess, timeout_s: float = 30.0) -> engine_pb2.EngineStats:
    """Stats once no sequence runs or waits and every KV block is free
    (cached-free blocks count as free); the last Stats when that never comes."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = engine_stats(server.engine_target)
        idle = stats.load.num_running == 0 and stats.load.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def assert_no_leak(stats: engine_pb2.EngineStats) -> None:
    assert stats.load.num_running == 0 and stats.load.num_waiting == 0, stats
    assert stats.num_free_blocks == stats.num_total_blocks, stats
    assert stats.num_cached_free_blocks <= stats.num_free_blocks
    assert stats.load.kv_cache_usage == 0


@pytest.fixture(scope="module")
def hf_greedy_chat(hf_model, hf_tokenizer) -> tuple[list[int], list[int]]:  # type: ignore[no-untyped-def]
    """HF transformers' greedy reply to CHAT as (prompt ids, reply ids), generated once for the module."""
    import torch

    prompt = hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = hf_model.generate(**prompt, max_new_tokens=CHAT_MAX_TOKENS, do_sample=False)
    prompt_ids = prompt["input_ids"][0].tolist()
    return prompt_ids, output[0, len(prompt_ids) :].tolist()


# --- OpenAI-compatible REST --------------------------------------------------


def test_openai_chat_equals_hf_greedy_with_and_without_streaming(openai_client: openai.OpenAI, hf_greedy_chat, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    max_tokens = CHAT_MAX_TOKENS
    assert [model.id for model in openai_client.models.list()] == [MODEL]
    whole = openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=max_tokens, temperature=0)
    stream = openai_client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    events = list(stream)
    streamed = "".join(event.choices[0].delta.content or "" for event in events if event.choices)
    expected = hf_tokenizer.decode(hf_greedy_chat[1], skip_special_tokens=True)

    assert whole.choices[0].message.content == expected
    assert streamed == expected
    assert whole.choices[0].finish_reason == [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason][0]
    assert events[-1].choices == [] and events[-1].usage is not None
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    assert events[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    # The same prompt again: its full blocks come from the prefix cache.
    assert events[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_openai_completion_stream_ends_with_done_and_logprobs_have_text(server: ServeProcess) -> None:
    body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 4, "temperature": 0, "logprobs": 2, "stream": True}
    with httpx.stream("POST", f"{server.rest_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    tokens = [token for chunk in chunks for token in (chunk["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert len(tokens) == 4
    assert "".join(tokens) == "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert all(len(chunk["choices"][0]["logprobs"]["top_logprobs"][0]) <= 2 for chunk in chunks if chunk["choices"][0]["logprobs"])


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        (b'{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", ', 400, None, "not valid JSON"),
        (b'{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": "lots"}', 400, "max_tokens", "valid integer"),
        (b'{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": -5}', 400, "max_tokens", "greater than or equal to 1"),
        (b'{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "temperature": -1}', 400, "temperature", "[0, 100]"),
        (b'{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "top_k": 2147483648}', 400, "top_k", "less than or equal to 2147483647"),
        (b'{"model": "SmolLM2-135M-Instruct", "prompt": [1, -2]}', 400, "prompt", "prompt"),
        (b'{"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "n": 17}', 400, "n", "must be in [1, 16]"),
        (b'{"model": "SmolLM2-135M-Instruct", "prompt": ""}', 400, "text", "empty"),
        (b'{"model": "gpt-4", "prompt": "Hi"}', 404, None, "'gpt-4' is not served here"),
        (json.dumps({"model": MODEL, "prompt": "hello " * 600}).encode(), 400, "prompt", "shorten the prompt"),
        (json.dumps({"model": MODEL, "prompt": "x" * (MAX_MESSAGE_BYTES + 10)}).encode(), 413, None, f"max_model_len {MAX_MODEL_LEN}"),
    ],
    ids=["malformed-json", "wrong-type", "negative-max-tokens", "bad-temperature", "top-k-past-int32", "negative-token-id", "n", "empty-prompt", "unknown-model", "prompt-too-long", "oversized"],
)
def test_rest_bad_input_gets_openai_errors_and_the_server_goes_on(server: ServeProcess, body: bytes, status: int, param: str | None, words: str) -> None:
    with httpx.Client(base_url=server.rest_url, timeout=60) as client:
        response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert words in error["message"]
        assert error["param"] == param
        good = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert good.status_code == 200, good.text


def test_rest_chat_errors(openai_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad_role:
        openai_client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "Hi"}], max_tokens=2)
    assert "role" in bad_role.value.message
    with pytest.raises(openai.BadRequestError) as no_messages:
        openai_client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert "no messages" in no_messages.value.message
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="llama-9000", messages=CHAT, max_tokens=2)


# --- gRPC --------------------------------------------------------------------


def test_grpc_16_concurrent_requests_with_4_cancelled_leave_no_kv_blocks(server: ServeProcess, stub: gateway_pb2_grpc.GenerationStub) -> None:
    cancelled = {f"req-{i}" for i in range(0, 16, 4)}
    stream = BidiStream(stub)
    for i in range(16):
        request_id = f"req-{i}"
        # The cancelled ones would run long, so they are surely mid-generation.
        sampling = common_pb2.SamplingParams(temperature=0, max_tokens=200 if request_id in cancelled else 8, ignore_eos=request_id in cancelled)
        chat = gateway_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=f"Tell me a fact about the number {i}.")])
        stream.start(gateway_pb2.GenerateRequest(request_id=request_id, chat=chat, sampling=sampling))

    texts: dict[str, str] = {}
    last: dict[str, gateway_pb2.GenerateChunk] = {}
    for chunk in stream.chunks():
        if chunk.request_id in cancelled and chunk.request_id not in texts and chunk.text:
            stream.cancel(chunk.request_id)
        texts[chunk.request_id] = texts.get(chunk.request_id, "") + chunk.text
        if chunk.finish_reason:
            last[chunk.request_id] = chunk
            if len(last) == 16:
                stream.close()

    assert sorted(last) == sorted(f"req-{i}" for i in range(16))
    for request_id, chunk in last.items():
        if request_id in cancelled:
            assert chunk.finish_reason == common_pb2.FINISH_REASON_CANCELLED
            assert 0 < chunk.usage.completion_tokens < 200
        else:
            assert chunk.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH), chunk
            assert texts[request_id] and chunk.usage.completion_tokens <= 8
        assert not chunk.error.code
    assert_no_leak(wait_engine_idle(server))


def test_grpc_disconnect_and_deadline_abort_in_the_engine(server: ServeProcess, stub: gateway_pb2_grpc.GenerationStub) -> None:
    long = common_pb2.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    stream = BidiStream(stub)
    for i in range(3):
        stream.start(gateway_pb2.GenerateRequest(request_id=f"gone-{i}", text=f"Count to a thousand, step {i}:", sampling=long))
    chunks = stream.chunks()
    next(chunks)
    stream.call.cancel()  # the client goes away mid-generation
    assert_no_leak(wait_engine_idle(server))

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as raised:
        for _ in stub.Complete(gateway_pb2.GenerateRequest(text="Count to a thousand:", sampling=long), timeout=1.5):
            pass
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 10
    assert_no_leak(wait_engine_idle(server))

    # The request's own timeout ends it as TIME_LIMIT, with what it produced so far.
    request = gateway_pb2.GenerateRequest(text="Count to a thousand:", sampling=long)
    request.timeout.FromMilliseconds(1500)
    chunks = list(stub.Complete(request, timeout=60))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_TIME_LIMIT
    assert 0 < chunks[-1].usage.completion_tokens < 400
    assert_no_leak(wait_engine_idle(server))


def test_grpc_greedy_token_ids_equal_hf_and_text_is_their_decode(stub: gateway_pb2_grpc.GenerationStub, hf_greedy_chat, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompt_ids, expected_ids = hf_greedy_chat
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=CHAT_MAX_TOKENS)
    chat = gateway_pb2.ChatInput(messages=[common_pb2.ChatMessage(**message) for message in CHAT])
    # The same prompt as ids (straight to the engine) and as chat (through the tokenizer's template).
    stream = BidiStream(stub)
    stream.start(gateway_pb2.GenerateRequest(request_id="ids", token_ids=gateway_pb2.TokenIds(ids=prompt_ids), sampling=sampling))
    stream.start(gateway_pb2.GenerateRequest(request_id="chat", chat=chat, sampling=sampling))
    # Ids out without the tokenizer: the same ids, no text, a chunk per step.
    stream.start(gateway_pb2.GenerateRequest(request_id="ids-only", chat=chat, sampling=sampling, token_ids_only=True))
    stream.close()  # the gateway finishes what is in flight after the half-close
    ids: dict[str, list[int]] = {"ids": [], "chat": [], "ids-only": []}
    texts = {"ids": "", "chat": "", "ids-only": ""}
    chunk_count = dict.fromkeys(ids, 0)
    last: dict[str, gateway_pb2.GenerateChunk] = {}
    for chunk in stream.chunks():
        ids[chunk.request_id] += chunk.token_ids
        texts[chunk.request_id] += chunk.text
        chunk_count[chunk.request_id] += 1
        if chunk.finish_reason:
            last[chunk.request_id] = chunk

    assert sorted(last) == ["chat", "ids", "ids-only"]
    for request_id, chunk in last.items():
        assert not chunk.error.code, chunk
        assert ids[request_id] == expected_ids, request_id
        decoded = "" if request_id == "ids-only" else hf_tokenizer.decode(expected_ids, skip_special_tokens=True)
        assert texts[request_id] == decoded, request_id
        assert chunk.usage.completion_tokens == len(expected_ids)
        assert chunk.usage.prompt_tokens == len(prompt_ids)
    assert chunk_count["ids-only"] >= len(expected_ids) // 2  # streamed, not held to the end


def grpc_error(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    return raised.value


def test_grpc_bad_input(server: ServeProcess, stub: gateway_pb2_grpc.GenerationStub) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=2)
    cases = [
        (gateway_pb2.GenerateRequest(text="Hi", model="gpt-4"), grpc.StatusCode.NOT_FOUND, "'gpt-4' is not served here"),
        (gateway_pb2.GenerateRequest(text=""), grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
        (gateway_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no input"),
        (gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
        (gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(n=17)), grpc.StatusCode.INVALID_ARGUMENT, "n must be in [1, 16]"),
        (gateway_pb2.GenerateRequest(text="hello " * 600, sampling=sampling), grpc.StatusCode.INVALID_ARGUMENT, "shorten the prompt"),
        (gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[1, 10**6]), sampling=sampling), grpc.StatusCode.INVALID_ARGUMENT, "vocab"),
        (
            gateway_pb2.GenerateRequest(chat=gateway_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="wizard", content="Hi")])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "role",
        ),
        (gateway_pb2.GenerateRequest(text="Hi", stop=["."], token_ids_only=True), grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids"),
    ]
    for request, code, words in cases:
        error = grpc_error(stub.Complete(request, timeout=60))
        assert error.code() == code, (request, error)
        assert words in error.details(), error.details()
    # Field errors name the field in a google.rpc.BadRequest detail.
    status = rpc_status.from_call(grpc_error(stub.Complete(gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(top_p=0)))))
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "top_p"

    oversized = grpc_error(stub.Complete(gateway_pb2.GenerateRequest(text="x" * (MAX_MESSAGE_BYTES + 10)), timeout=60))
    assert oversized.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # On the bidi stream a bad request fails alone; the others on it go on.
    stream = BidiStream(stub)
    stream.start(gateway_pb2.GenerateRequest(request_id="good", text="Hi", sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0)))
    stream.start(gateway_pb2.GenerateRequest(request_id="good", text="Hi again"))
    stream.start(gateway_pb2.GenerateRequest(request_id="hot", text="Hi", sampling=common_pb2.SamplingParams(temperature=101)))
    stream.start(gateway_pb2.GenerateRequest(text="no id"))
    stream.cancel("never-started")
    finals = []
    duplicates = []
    for chunk in stream.chunks():
        if chunk.error.code and not chunk.finish_reason:
            duplicates.append(chunk)
        if chunk.finish_reason:
            finals.append(chunk)
            if len(finals) == 3:
                stream.close()
    # The duplicate start is refused without a finish reason; the live
    # request of that id goes on to its one last chunk.
    assert [(d.request_id, d.error.code) for d in duplicates] == [("good", grpc.StatusCode.INVALID_ARGUMENT.value[0])]
    assert "already in flight" in duplicates[0].error.message
    assert sorted(f.request_id for f in finals) == ["", "good", "hot"]
    by_outcome = {(f.request_id, f.finish_reason): f for f in finals}
    assert "temperature" in by_outcome[("hot", common_pb2.FINISH_REASON_ERROR)].error.message
    assert "request_id is required" in by_outcome[("", common_pb2.FINISH_REASON_ERROR)].error.message
    good = [f for f in finals if f.request_id == "good" and not f.error.code]
    assert good and good[0].usage.completion_tokens > 0

    chunks = list(stub.Complete(gateway_pb2.GenerateRequest(text="Hi", sampling=sampling), timeout=60))
    assert chunks[-1].usage.completion_tokens > 0


def test_grpc_stop_string_ends_the_request_and_frees_it_in_the_engine(server: ServeProcess, stub: gateway_pb2_grpc.GenerationStub) -> None:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=40)
    chat = gateway_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=CHAT[0]["content"])])
    free = "".join(chunk.text for chunk in stub.Complete(gateway_pb2.GenerateRequest(chat=chat, sampling=sampling), timeout=60))
    stop = free.split()[2]
    chunks = list(stub.Complete(gateway_pb2.GenerateRequest(chat=chat, sampling=sampling, stop=[stop]), timeout=60))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert chunks[-1].matched_stop == stop
    assert "".join(chunk.text for chunk in chunks) == free[: free.index(stop)]
    assert_no_leak(wait_engine_idle(server))


def test_list_models_health_and_metrics(server: ServeProcess, stub: gateway_pb2_grpc.GenerationStub) -> None:
    (card,) = stub.ListModels(gateway_pb2.ListModelsRequest()).models
    assert (card.id, card.max_model_len) == (MODEL, MAX_MODEL_LEN)
    assert httpx.get(f"{server.rest_url}/health").json() == {"status": "ok"}
    list(stub.Complete(gateway_pb2.GenerateRequest(text="Hello", sampling=common_pb2.SamplingParams(max_tokens=3)), timeout=60))
    wait_engine_idle(server)
    text = httpx.get(f"{server.rest_url}/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}
    replica = (("replica", server.engine_target),)
    assert samples[("pagewire_kv_cache_usage_ratio", replica)] == 0
    assert samples[("pagewire_requests_running", replica)] == 0
    assert samples[("pagewire_requests_waiting", replica)] == 0
    assert 0 <= samples[("pagewire_prefix_cache_hit_ratio", replica)] <= 1
    assert samples[("pagewire_requests_total", (("outcome", "length"),))] >= 1
    assert samples[("pagewire_prompt_tokens_total", ())] > 0
    assert samples[("pagewire_generation_tokens_total", ())] >= 3
    for histogram in ("time_to_first_token", "time_per_output_token", "e2e_request_latency", "queue_time"):
        assert samples[(f"pagewire_{histogram}_seconds_count", ())] >= 1


def test_gateway_reflection_lists_its_services_and_serves_the_generation_descriptor(server: ServeProcess) -> None:
    compiled = gateway_pb2.DESCRIPTOR.services_by_name["Generation"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        # Resolving the service pulls its file and every import over reflection.
        fetched = DescriptorPool(database).FindServiceByName(compiled.full_name)
        methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in fetched.methods}
    assert {compiled.full_name, "grpc.health.v1.Health"} <= services, services
    assert methods == {m.name: (m.input_type.full_name, m.output_type.full_name) for m in compiled.methods}
    assert fetched.file.serialized_pb == compiled.file.serialized_pb


def test_examples_python_client(server: ServeProcess) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "python_client.py"
    result = subprocess.run([sys.executable, str(example), server.grpc_target], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def npm_registry_reachable(cwd: Path) -> bool:
    try:
        return subprocess.run(["npm", "ping"], cwd=cwd, capture_output=True, timeout=60).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_examples_node_client(server: ServeProcess, tmp_path: Path) -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    examples = Path(__file__).resolve().parents[2] / "examples" / "node"
    work = tmp_path / "node"
    shutil.copytree(examples, work)
    install = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefer-offline"], cwd=work, capture_output=True, text=True, timeout=180)
    if install.returncode != 0:
        # Only an unreachable registry excuses a failed install; a broken package.json must fail.
        if not npm_registry_reachable(work):
            pytest.skip(f"npm registry unreachable: {install.stderr[-300:]}")
        pytest.fail(f"npm install failed with the registry reachable:\n{install.stderr[-3000:]}")
    protos = Path(__file__).resolve().parents[2] / "protos"
    result = subprocess.run(
        ["node", "client.js", server.grpc_target], cwd=work, capture_output=True, text=True, timeout=120, env={"PATH": os.environ["PATH"], "PAGEWIRE_PROTOS": str(protos)}
    )
    assert result.returncode == 0, result.stderr
    finished = re.findall(r"^(\w+) \[(FINISH_REASON_\w+), (\d+) tokens\]: \S", result.stdout, flags=re.MULTILINE)
    assert sorted(request_id for request_id, _, _ in finished) == ["colours", "fruit"], result.stdout
    assert all(reason in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH") and int(tokens) > 0 for _, reason, tokens in finished)


def test_rest_client_that_goes_away_frees_the_request(server: ServeProcess) -> None:
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.rest_url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert engine_stats(server.engine_target).load.num_running == 1
    assert_no_leak(wait_engine_idle(server))

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.rest_url}/v1/completions", json={**body, "stream": False}, timeout=1.5)
    assert_no_leak(wait_engine_idle(server))


def test_internal_services_listen_on_loopback_only(server: ServeProcess) -> None:
    assert server.process is not None
    processes = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    listening: dict[int, set[str]] = {}
    for process in processes:
        for connection in process.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                listening.setdefault(connection.laddr.port, set()).add(connection.laddr.ip)
    # The tokenizer and engine carry no API key: only the gateway may reach
    # them. gRPC may bind 127.0.0.1 as its IPv4-mapped IPv6 form.
    for name in ("tokenizer_port", "engine_port"):
        addresses = [ipaddress.ip_address(ip) for ip in listening[server.ports[name]]]
        assert all((getattr(a, "ipv4_mapped", None) or a).is_loopback for a in addresses), (name, addresses)
    assert server.ports["port"] in listening and server.ports["http_port"] in listening


# --- OpenAI request fields: n, logit_bias, seed, echo, several prompts -------

STORY = "Once upon a time in a village by the sea there lived an old fisherman who told stories to the children every evening about"


def test_openai_n_choices_share_the_prompt_and_seeded_ones_reproduce(server: ServeProcess, openai_client: openai.OpenAI) -> None:
    one = openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    two = openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == two.choices[1].message.content == one.choices[0].message.content
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens and two.usage.prompt_tokens == one.usage.prompt_tokens

    # A prompt no earlier request had: the followers' hits come from the first choice.
    before = engine_stats(server.engine_target)
    sampled = dict(model=MODEL, prompt=f"{time.time_ns()} {STORY}", max_tokens=8, temperature=1.5, seed=1234, n=3, extra_body={"ignore_eos": True})
    first = openai_client.completions.create(**sampled)  # type: ignore[call-overload]
    hits = engine_stats(server.engine_target).prefix_cache_hit_tokens - before.prefix_cache_hit_tokens
    again = openai_client.completions.create(**sampled)  # type: ignore[call-overload]
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
    assert first.usage.completion_tokens == 24
    # Each follower found the prompt's full blocks cached (all but its last, partial one).
    assert hits >= 2 * (first.usage.prompt_tokens - 16 - 1) > 0, hits

    stream = openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, n=2, stream=True, stream_options={"include_usage": True})
    events = list(stream)
    content = {0: "", 1: ""}
    finished = []
    for event in events:
        for choice in event.choices:
            content[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert content == {0: one.choices[0].message.content, 1: one.choices[0].message.content}
    assert sorted(finished) == [0, 1]
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == two.usage.completion_tokens
    assert_no_leak(wait_engine_idle(server))


def test_grpc_n_tags_chunks_and_a_cancel_ends_every_completion(server: ServeProcess, stub: gateway_pb2_grpc.GenerationStub) -> None:
    request = gateway_pb2.GenerateRequest(text="The sky is", sampling=common_pb2.SamplingParams(temperature=0, max_tokens=6, n=2, ignore_eos=True))
    chunks = list(stub.Complete(request, timeout=60))
    finals = [c for c in chunks if c.finish_reason]
    assert sorted(c.index for c in finals) == [0, 1] and all(c.finish_reason == common_pb2.FINISH_REASON_LENGTH for c in finals)
    assert [c.HasField("usage") for c in finals] == [False, True] and finals[-1].usage.completion_tokens == 12
    texts = ["".join(c.text for c in chunks if c.index == i) for i in (0, 1)]
    assert texts[0] == texts[1] != ""

    stream = BidiStream(stub)
    long = common_pb2.SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, n=3)
    stream.start(gateway_pb2.GenerateRequest(request_id="many", text="Count to a thousand:", sampling=long))
    ended = []
    for chunk in stream.chunks():
        if chunk.text and not ended:
            stream.cancel("many")
        if chunk.finish_reason:
            ended.append(chunk)
            if len(ended) == 3:
                stream.close()
    assert sorted(c.index for c in ended) == [0, 1, 2]
    assert all(c.finish_reason == common_pb2.FINISH_REASON_CANCELLED for c in ended)
    assert_no_leak(wait_engine_idle(server))


def test_grpc_token_ids_only_with_n_and_logprobs_matches_the_text_request(server: ServeProcess, stub: gateway_pb2_grpc.GenerationStub) -> None:
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=6, n=2, ignore_eos=True, logprobs=2)
    per_request: dict[bool, dict[int, list[gateway_pb2.GenerateChunk]]] = {}
    for ids_only in (False, True):
        chunks = list(stub.Complete(gateway_pb2.GenerateRequest(text="The sky is", sampling=sampling, token_ids_only=ids_only), timeout=60))
        per_request[ids_only] = {index: [c for c in chunks if c.index == index] for index in (0, 1)}
        assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1]
        assert chunks[-1].usage.completion_tokens == 12
    for index in (0, 1):
        with_text, ids_only = per_request[False][index], per_request[True][index]
        ids = [token for c in ids_only for token in c.token_ids]
        assert ids == [token for c in with_text for token in c.token_ids] and len(ids) == 6
        assert not any(c.text for c in ids_only)
        logprobs = [entry for c in ids_only for entry in c.logprobs]
        expected = [entry for c in with_text for entry in c.logprobs]
        assert [entry.token_id for entry in logprobs] == ids
        # The second request reuses the first's prompt blocks, so its sums differ in the last bits.
        assert [entry.logprob for entry in logprobs] == pytest.approx([entry.logprob for entry in expected], abs=1e-4)
        assert all(len(entry.top_logprobs) == 2 and not entry.token and not any(top.token for top in entry.top_logprobs) for entry in logprobs)
        assert all(entry.token for entry in expected)  # the text request's logprobs name their tokens
    assert_no_leak(wait_engine_idle(server))


def test_logit_bias_forces_a_token_and_bad_ones_are_refused(stub: gateway_pb2_grpc.GenerationStub, openai_client: openai.OpenAI, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    token = hf_tokenizer.encode(" banana")[0]
    forced = openai_client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3, temperature=0, logit_bias={str(token): 100})
    assert forced.choices[0].text == hf_tokenizer.decode([token] * 3)
    chat = openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, temperature=0, logit_bias={str(token): 100})
    assert chat.choices[0].message.content == hf_tokenizer.decode([token] * 2)

    for bias, words in [({"5": 101}, "[-100, 100]"), ({str(10**6): 1}, "vocabulary"), ({"x": 1}, "token ids")]:
        with pytest.raises(openai.BadRequestError) as refused:
            openai_client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, logit_bias=bias)
        assert refused.value.body["param"] == "logit_bias" and words in refused.value.message  # type: ignore[index]
    for sampling in [common_pb2.SamplingParams(logit_bias={5: -101}), common_pb2.SamplingParams(logit_bias={10**6: 1})]:
        status = rpc_status.from_call(grpc_error(stub.Complete(gateway_pb2.GenerateRequest(text="Hi", sampling=sampling), timeout=60)))
        bad_request = error_details_pb2.BadRequest()
        assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and status.details[0].Unpack(bad_request)
        assert bad_request.field_violations[0].field == "logit_bias"


def test_negative_seed_reproduces_and_differs_from_its_absolute_value(openai_client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return openai_client.completions.create(model=MODEL, prompt=STORY, max_tokens=12, temperature=1.5, seed=seed, extra_body={"ignore_eos": True}).choices[0].text  # type: ignore[call-overload]

    assert sample(-7) == sample(-7)
    assert sample(-(2**63)) == sample(-(2**63))
    with pytest.raises(openai.BadRequestError) as refused:
        sample(2**63)
    assert refused.value.body["param"] == "seed"  # type: ignore[index]


def test_echo_and_several_prompts(server: ServeProcess, openai_client: openai.OpenAI) -> None:
    plain = openai_client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0).choices[0].text
    echoed = openai_client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "The sky is" + plain
    stream = list(openai_client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, temperature=0, echo=True, stream=True))
    assert stream[0].choices[0].text.startswith("The sky is")
    assert "".join(event.choices[0].text for event in stream) == "The sky is" + plain
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, echo=True, logprobs=1)
    assert refused.value.body["param"] == "echo"  # type: ignore[index]

    other = openai_client.completions.create(model=MODEL, prompt="Paris is", max_tokens=4, temperature=0).choices[0].text
    batch = openai_client.completions.create(model=MODEL, prompt=["The sky is", "Paris is"], max_tokens=4, temperature=0, n=2)
    assert [(c.index, c.text) for c in batch.choices] == [(0, plain), (1, plain), (2, other), (3, other)]
    ids = openai_client.completions.create(model=MODEL, prompt=[[504, 3817], [504, 3817]], max_tokens=2, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1] and ids.choices[0].text == ids.choices[1].text
    with pytest.raises(openai.BadRequestError) as too_many:
        openai_client.completions.create(model=MODEL, prompt=["Hi"] * 17, max_tokens=2)
    assert too_many.value.body["param"] == "prompt"  # type: ignore[index]
    assert_no_leak(wait_engine_idle(server))


@pytest.mark.parametrize(("field", "value"), [("suffix", " the end"), ("best_of", 2)])
def test_suffix_and_best_of_are_refused_naming_them(openai_client: openai.OpenAI, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, **{field: value})  # type: ignore[call-overload]
    assert refused.value.body["param"] == field  # type: ignore[index]
