"""A bad request fails alone, against a real tokenizer, engine and gateway:
bodies and prompts too large for any model served are refused before they
cost memory or tokenization, OpenAI fields that would change the answer are
refused rather than dropped, max_tokens is bounded, POST bodies must be JSON,
a client that goes away is an info line, and limits on timeouts and stop
token ids hold on both doors."""

from __future__ import annotations

import json
import http.client
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest
from google.protobuf.duration_pb2 import Duration

from pagewire.services.common.limits import MAX_STOP_TOKEN_IDS, max_prompt_chars, max_rest_body_bytes
from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.bidi_stream import BidiStream
from tests.support.harness import Cluster, ServiceProcess, engine_stats, wait_until

MAX_MODEL_LEN = 2048
ENGINE_ARGS = ["--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "256"]
# The default --max-message-bytes (64 MiB): the REST body limit comes from max_model_len.
FLOOD_BODIES = 20
FLOOD_BODY_BYTES = 8 << 20
WAIT_S = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster.create(tmp_path_factory.mktemp("isolation"), engine_args=ENGINE_ARGS)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def rest(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.rest_url, timeout=WAIT_S) as client:
        yield client


@pytest.fixture(scope="module")
def stub(cluster: Cluster) -> Iterator[gateway_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(cluster.gateway.address) as channel:
        yield gateway_pb2_grpc.GenerationStub(channel)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def grpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        list(call)
    return raised.value


def small_completion(rest: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = rest.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2} | fields)
    assert response.status_code == 200, response.text
    return response.json()


def latency_of_small_completion(rest: httpx.Client) -> float:
    started = time.monotonic()
    small_completion(rest)
    return time.monotonic() - started


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# --- sizes -------------------------------------------------------------------


def flood(rest_url: str, bodies: int, body_bytes: int) -> list[tuple[str, str]]:
    """POST `bodies` bodies of `body_bytes` bytes of token ids at once; the
    outcome of each (status or transport error, text). Run in a process of
    its own, so that the test's own requests do not queue behind it."""
    # Five-digit ids: 7 bytes each with their separator.
    ids = ", ".join(str(10000 + i % 30000) for i in range(body_bytes // 7 + 1))
    body = f'{{"prompt": [{ids}], "max_tokens": 1}}'.encode()
    assert len(body) > body_bytes

    def send() -> tuple[str, str]:
        try:
            with httpx.Client(base_url=rest_url, timeout=WAIT_S) as client:
                response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            return str(response.status_code), response.text
        except httpx.TransportError as exc:
            # The gateway answers 413 without reading the body, and closes:
            # a client still writing may see the close first.
            return type(exc).__name__, str(exc)

    with ThreadPoolExecutor(bodies) as pool:
        return list(pool.map(lambda _: send(), range(bodies)))


def test_a_flood_of_8_mb_bodies_is_refused_at_little_memory_and_latency(cluster: Cluster, rest: httpx.Client) -> None:
    limit = max_rest_body_bytes(MAX_MODEL_LEN)
    assert limit < FLOOD_BODY_BYTES
    gateway = psutil.Process(cluster.gateway.pid)
    baseline = [latency_of_small_completion(rest) for _ in range(5)]
    cpu_before = sum(gateway.cpu_times()[:2])
    before = rss(cluster.gateway.pid)
    peak = before
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        flooding = pool.submit(flood, cluster.rest_url, FLOOD_BODIES, FLOOD_BODY_BYTES)
        during = []
        while not flooding.done() or len(during) < 3:
            peak = max(peak, rss(cluster.gateway.pid))
            during.append(latency_of_small_completion(rest))
            peak = max(peak, rss(cluster.gateway.pid))
        outcomes = flooding.result()
    cpu_s = sum(gateway.cpu_times()[:2]) - cpu_before

    assert len(outcomes) == FLOOD_BODIES
    assert all(outcome in ("413", "WriteError", "RemoteProtocolError", "ReadError") for outcome, _ in outcomes), outcomes
    refusals = [text for outcome, text in outcomes if outcome == "413"]
    assert refusals and all(f"at most {limit} are accepted" in text and f"max_model_len {MAX_MODEL_LEN}" in text for text in refusals), refusals
    assert peak - before < 200 << 20, f"the gateway grew by {(peak - before) >> 20} MiB"
    # The refusals cost the gateway's event loop next to nothing, so the
    # requests beside them wait no longer than the machine's noise (2 shared
    # cores): validating one such body took seconds of the loop's time.
    assert cpu_s < 2.0, f"the gateway spent {cpu_s:.2f} s of CPU on the flood"
    assert max(during) < max(baseline) + 3.0, (baseline, during)


def test_prompts_longer_than_any_that_fits_are_refused_before_parsing_or_tokenization(
    cluster: Cluster, rest: httpx.Client, stub: gateway_pb2_grpc.GenerationStub
) -> None:
    # Under the body limit, but more ids than max_model_len: refused before validation, naming the field.
    too_many = rest.post("/v1/completions", json={"prompt": [1] * (max_rest_body_bytes(MAX_MODEL_LEN) // 4)})
    error = error_of(too_many, 400)
    assert error["param"] == "prompt" and f"max_model_len {MAX_MODEL_LEN}" in error["message"]
    # Text far past what max_model_len tokens can hold never reaches the tokenizer.
    tokenizer_before = rss(cluster.tokenizer.pid)
    text = "x " * max_prompt_chars(MAX_MODEL_LEN) * 10
    refused = grpc_error(stub.Complete(gateway_pb2.GenerateRequest(text=text), timeout=WAIT_S))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "shorten the prompt" in (refused.details() or "")
    chat = [{"role": "user", "content": text[: len(text) // 8]}]
    error = error_of(rest.post("/v1/chat/completions", json={"messages": chat}), 400)
    assert error["param"] == "prompt" and "characters" in error["message"]
    assert rss(cluster.tokenizer.pid) - tokenizer_before < 50 << 20
    small_completion(rest)


def test_prompt_ids_outside_the_vocabulary_are_refused_naming_the_prompt(rest: httpx.Client, stub: gateway_pb2_grpc.GenerationStub) -> None:
    # The largest id a client can send (uint32 on gRPC), and the first past the
    # vocabulary the refusal names: both are the caller's `prompt`, never a
    # field of the gateway's internal messages.
    error = error_of(rest.post("/v1/completions", json={"prompt": [1, 4294967295], "max_tokens": 1}), 400)
    assert error["param"] == "prompt" and "vocabulary of" in error["message"], error
    vocab_size = int(error["message"].rsplit("vocabulary of ", 1)[1].split()[0])
    error = error_of(rest.post("/v1/completions", json={"prompt": [vocab_size], "max_tokens": 1}), 400)
    assert error["param"] == "prompt", error
    refused = grpc_error(stub.Complete(gateway_pb2.GenerateRequest(token_ids=gateway_pb2.TokenIds(ids=[vocab_size])), timeout=WAIT_S))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in (refused.details() or "")
    assert rest.post("/v1/completions", json={"prompt": [vocab_size - 1], "max_tokens": 1}).status_code == 200


# --- OpenAI fields -------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "suffix", " and so on"),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "logit_bias", {"50256": -100}),
        ("/v1/chat/completions", "logit_bias", {"50256": -100}),
        ("/v1/chat/completions", "response_format", {"type": "xml"}),
        ("/v1/chat/completions", "tools", [{"type": "retrieval"}]),
        ("/v1/chat/completions", "tool_choice", "required"),
        ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
        ("/v1/chat/completions", "min_tokens", 5),
        ("/v1/completions", "guided_json", {"type": "object"}),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_naming_them(rest: httpx.Client, path: str, field: str, value: Any) -> None:
    base: dict[str, Any] = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    error = error_of(rest.post(path, json=base | {"max_tokens": 2, field: value}), 400)
    assert error["param"] == field, error
    assert field in error["message"]


def test_fields_that_change_nothing_are_accepted_and_seed_and_stream_options_work(rest: httpx.Client) -> None:
    neutral = {"user": "u-1", "metadata": {"team": "a"}, "store": False, "logit_bias": {}, "suffix": None, "best_of": 1}
    first = small_completion(rest, temperature=1.0, seed=7, **neutral)
    assert small_completion(rest, temperature=1.0, seed=7)["choices"][0]["text"] == first["choices"][0]["text"]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "response_format": {"type": "text"}, "tool_choice": "none", "tools": []}
    with rest.stream("POST", "/v1/chat/completions", json=chat | {"stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 2


# --- max_tokens ------------------------------------------------------------------


def test_max_tokens_null_is_openais_default_and_past_max_model_len_is_refused(rest: httpx.Client, stub: gateway_pb2_grpc.GenerationStub) -> None:
    for body in ({"max_tokens": None}, {}):
        response = rest.post("/v1/completions", json={"prompt": "Count on:", "ignore_eos": True} | body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 16
    for path, body in [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**9}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": MAX_MODEL_LEN + 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 10**9}),
    ]:
        error = error_of(rest.post(path, json=body), 400)
        assert error["param"] == "max_tokens" and f"at most {MAX_MODEL_LEN}" in error["message"], error
    refused = grpc_error(stub.Complete(gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(max_tokens=10**9)), timeout=WAIT_S))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in (refused.details() or "")


# --- POST bodies are JSON ---------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/json; charset=latin-1", "application/jsonx"],
)
def test_a_body_not_sent_as_json_gets_415(rest: httpx.Client, content_type: str | None) -> None:
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    for path in ("/v1/completions", "/v1/chat/completions"):
        error = error_of(rest.post(path, content=body, headers=headers), 415)
        assert "application/json" in error["message"] and error["type"] == "invalid_request_error"


def test_json_with_a_utf_8_charset_is_accepted(rest: httpx.Client) -> None:
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    for content_type in ("application/json; charset=utf-8", "Application/JSON;charset=\"UTF-8\""):
        assert rest.post("/v1/completions", content=body, headers={"content-type": content_type}).status_code == 200


def test_an_idle_keep_alive_connection_outlives_the_clients_own_expiry(cluster: Cluster) -> None:
    """httpx (and so the openai client) keeps an idle connection for 5 s; a
    server that closed it at the same moment would race the client's next
    request on it. After 6 idle seconds the same connection still answers."""
    url = httpx.URL(cluster.rest_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=WAIT_S)
    try:
        for pause_s in (0, 6):
            time.sleep(pause_s)
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and not response.will_close, (pause_s, response.status, response.getheaders())
            response.read()
            if pause_s == 0:
                opened = connection.sock
        assert connection.sock is opened  # the same TCP connection both times
    finally:
        connection.close()


# --- a client that goes away ------------------------------------------------------


def test_a_rest_client_that_goes_away_is_an_info_line_not_a_traceback(cluster: Cluster) -> None:
    body = {"prompt": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster.rest_url}/v1/completions", json=body, timeout=1.5)

    def disconnect_lines() -> list[dict[str, Any]]:
        lines = cluster.gateway.log_path.read_text(errors="replace").splitlines()
        return [record for line in lines if line.startswith("{") and (record := json.loads(line)).get("event") == "client disconnected"]

    cluster.gateway.wait_until(lambda: bool(disconnect_lines()), "the gateway logs the disconnect", 30)
    (record,) = disconnect_lines()
    assert record["level"] == "info" and record["request_id"].startswith("req-")
    log = cluster.gateway.log_path.read_text(errors="replace")
    assert "Exception in ASGI application" not in log


# --- limits on both doors ------------------------------------------------------------


def test_an_overflowing_timeout_and_too_many_stop_token_ids_fail_alone(rest: httpx.Client, stub: gateway_pb2_grpc.GenerationStub) -> None:
    huge_timeout = gateway_pb2.GenerateRequest(text="Hi", timeout=Duration(seconds=10**14))
    refused = grpc_error(stub.Complete(huge_timeout, timeout=WAIT_S))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout" in (refused.details() or "")
    many_stops = common_pb2.SamplingParams(max_tokens=2, stop_token_ids=range(4_000_000))
    refused = grpc_error(stub.Complete(gateway_pb2.GenerateRequest(text="Hi", sampling=many_stops), timeout=WAIT_S))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_token_ids" in (refused.details() or "")
    error = error_of(rest.post("/v1/completions", json={"prompt": "Hi", "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}), 400)
    assert error["param"] == "stop_token_ids"

    # On one Generate stream both fail alone: later Starts are read and served, and the stream ends.
    stream = BidiStream(stub, timeout_s=WAIT_S)
    huge_timeout.request_id = "huge-timeout"
    stream.start(huge_timeout)
    stream.start(gateway_pb2.GenerateRequest(request_id="many-stops", text="Hi", sampling=many_stops))
    stream.start(gateway_pb2.GenerateRequest(request_id="fine", text="Hi", sampling=common_pb2.SamplingParams(max_tokens=2)))
    stream.close()
    finals = {chunk.request_id: chunk for chunk in stream.chunks() if chunk.finish_reason}
    assert sorted(finals) == ["fine", "huge-timeout", "many-stops"]
    assert finals["huge-timeout"].error.code == finals["many-stops"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert finals["fine"].usage.completion_tokens == 2 and not finals["fine"].error.code


# --- backpressure ---------------------------------------------------------------------

# A stalled request must reach this before it has --max-buffered-output-bytes
# waiting (at most half of SMALL_MESSAGE_BYTES): with 5 logprobs a token takes
# about 100 bytes, so 16 KiB is about 160 tokens, where a 2-core CPU makes
# about 33 in this time for each of the UNREAD_REQUESTS, and all of them
# together leave about 3x SMALL_MESSAGE_BYTES waiting.
READ_TIMEOUT_S = 3
# Far less than the 1500 tokens of LONG_WITH_LOGPROBS take on a CPU.
STALL_WAIT_S = 60
# Less than what waits for a client that stops reading: it must be split.
SMALL_MESSAGE_BYTES = 32 * 1024
UNREAD_REQUESTS = 32
LONG_WITH_LOGPROBS = common_pb2.SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True, logprobs=20)


@contextmanager
def gateway_of(cluster: Cluster, log_dir: Path, *flags: str) -> Iterator[ServiceProcess]:
    """Another gateway over the module's tokenizer and engine, with `flags`."""
    gateway = ServiceProcess(
        "gateway", ["--tokenizer", cluster.tokenizer.address, "--engine", cluster.engine.address, *flags], log_path=log_dir / "gateway.log"
    )
    with gateway.running():
        yield gateway


def engine_idle(cluster: Cluster) -> bool:
    stats = engine_stats(cluster.engine.address)
    return stats.load.num_running == stats.load.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_a_generate_client_that_stops_reading_has_its_requests_aborted_and_others_go_on(cluster: Cluster, tmp_path: Path) -> None:
    flags = ["--max-message-bytes", str(SMALL_MESSAGE_BYTES), "--client-read-timeout-s", str(READ_TIMEOUT_S)]
    # A client that takes no message over the limit, and whose window stays small.
    options = [("grpc.max_receive_message_length", SMALL_MESSAGE_BYTES), ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    sampling = common_pb2.SamplingParams(temperature=0, max_tokens=300, ignore_eos=True, logprobs=5)
    with gateway_of(cluster, tmp_path, *flags) as gateway, grpc.insecure_channel(gateway.address, options=options) as channel:
        stream = BidiStream(gateway_pb2_grpc.GenerationStub(channel), timeout_s=WAIT_S)
        for i in range(UNREAD_REQUESTS):
            stream.start(gateway_pb2.GenerateRequest(request_id=f"unread-{i}", text=f"Count to a thousand, step {i}:", sampling=sampling))
        next(stream.call)
        # The client reads no more: once its output waits READ_TIMEOUT_S, the requests are aborted.
        wait_until(lambda: engine_idle(cluster), "the engine has dropped the unread requests", STALL_WAIT_S, interval_s=0.5)
        with grpc.insecure_channel(gateway.address) as other:
            fine = list(gateway_pb2_grpc.GenerationStub(other).Complete(gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=WAIT_S))
        assert fine[-1].usage.completion_tokens == 2 and not fine[-1].error.code
        # Reading again, the client gets what waited in messages within its limit, and each request's end.
        stream.close()
        messages = list(stream.call)
    finals = {chunk.request_id: chunk for message in messages for chunk in message.chunks if chunk.finish_reason}
    assert sorted(finals) == sorted(f"unread-{i}" for i in range(UNREAD_REQUESTS))
    for final in finals.values():
        assert final.finish_reason == common_pb2.FINISH_REASON_ERROR and final.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0], final
        assert "--client-read-timeout-s" in final.error.message and final.usage.completion_tokens < sampling.max_tokens
    sizes = [message.ByteSize() for message in messages]
    assert max(sizes) <= SMALL_MESSAGE_BYTES < sum(sizes), sizes


def test_a_complete_client_that_stops_reading_is_aborted_once_its_unread_output_passes_the_bound(cluster: Cluster, tmp_path: Path) -> None:
    flags = ["--max-buffered-output-bytes", str(16 * 1024), "--client-read-timeout-s", "600"]
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    with gateway_of(cluster, tmp_path, *flags) as gateway, grpc.insecure_channel(gateway.address, options=options) as channel:
        call = gateway_pb2_grpc.GenerationStub(channel).Complete(gateway_pb2.GenerateRequest(text="Count to a thousand:", sampling=LONG_WITH_LOGPROBS), timeout=WAIT_S)
        next(call)
        # The client reads no more: past 16 KiB of unread output, the request is aborted.
        wait_until(lambda: engine_idle(cluster), "the engine has dropped the unread request", STALL_WAIT_S, interval_s=0.5)
        with grpc.insecure_channel(gateway.address) as other:
            fine = list(gateway_pb2_grpc.GenerationStub(other).Complete(gateway_pb2.GenerateRequest(text="Hi", sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=WAIT_S))
        assert fine[-1].usage.completion_tokens == 2 and not fine[-1].error.code
        refused = grpc_error(call)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-buffered-output-bytes" in (refused.details() or ""), refused
