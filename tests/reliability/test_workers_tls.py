"""`pagewire serve --gateway-workers 2 --tokenizer-workers 2` with TLS on both
public ports: every worker answers over TLS and refuses plaintext, and a
disconnect storm spread over both workers leaves no sequence running and no
KV block held, counted by whichever worker's /metrics answers."""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from pagewire.services.common.grpc_utils import check_health
from pagewire.services.common.tls import TlsFiles
from tests.reliability.clients import Outcome, StreamResult, completion_body, drop_streams, metric_values, rest_client, stream_completion, tally
from tests.support.harness import LOOPBACK, READINESS_SERVICE, ServeProcess

# Fresh connections a test spreads over the workers: all on one of two
# workers by chance once in 2^15.
CONNECTIONS = 16
STORM_CLIENTS = 48
SETTLE_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles) -> Iterator[ServeProcess]:
    args = ["--gateway-workers", "2", "--tokenizer-workers", "2", "--device", "cpu", "--num-kv-blocks", "512", "--max-model-len", "512"]
    args += ["--tls-cert", str(tls_files.cert_path), "--tls-key", str(tls_files.key_path)]
    process = ServeProcess(args, log_path=tmp_path_factory.mktemp("workers-tls") / "serve.log")
    with process.running():
        yield process


@pytest.fixture(scope="module")
def trust(tls_files: TlsFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_files.cert_path))


def _https_url(serve: ServeProcess) -> str:
    return f"https://{LOOPBACK}:{serve.ports['http_port']}"


def _workers_that_finished_requests(serve: ServeProcess) -> Counter[int]:
    return Counter(record["worker"] for record in serve.events("request finished", "gateway"))


def test_every_worker_answers_over_tls_and_refuses_plaintext(serve: ServeProcess, trust: ssl.SSLContext, tls_files: TlsFiles) -> None:
    roots = tls_files.cert_path.read_bytes()
    assert all(check_health(f"localhost:{serve.ports['port']}", READINESS_SERVICE["gateway"], root_certificates=roots) for _ in range(CONNECTIONS))
    assert not check_health(serve.grpc_target, READINESS_SERVICE["gateway"], timeout_s=1.0)
    statuses = []
    for _ in range(CONNECTIONS):
        # A fresh connection each, so that both workers are asked.
        with httpx.Client(base_url=_https_url(serve), verify=trust, timeout=60) as client:
            statuses.append(client.post("/v1/completions", json=completion_body(max_tokens=2)).status_code)
    assert statuses == [200] * CONNECTIONS
    assert set(_workers_that_finished_requests(serve)) == {0, 1}
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{serve.rest_url}/v1/completions", json=completion_body(max_tokens=2), timeout=10)


def test_a_disconnect_storm_over_both_workers_leaves_nothing_behind(serve: ServeProcess, trust: ssl.SSLContext) -> None:
    before = _workers_that_finished_requests(serve)

    async def storm() -> tuple[list[StreamResult], list[float], list[float], list[float], Outcome]:
        async with rest_client(_https_url(serve), verify=trust) as client:
            cancelled_before = await metric_values(client, 'pagewire_requests_total{outcome="cancelled"}')
            results, running, kv_usage, _ = await drop_streams(client, STORM_CLIENTS, SETTLE_TIMEOUT_S)
            after = await stream_completion(client, completion_body(max_tokens=4), timeout_s=60.0)
            cancelled = await metric_values(client, 'pagewire_requests_total{outcome="cancelled"}')
            return results, running, kv_usage, [sum(cancelled) - sum(cancelled_before)], after.outcome

    results, running, kv_usage, cancelled, after = asyncio.run(storm())
    counts = tally(results)
    assert counts["dropped"] == STORM_CLIENTS, counts
    assert running == [0.0] and kv_usage == [0.0], (running, kv_usage)
    assert after is Outcome.COMPLETED
    # The whole server counted every dropped stream, whichever worker it reached.
    assert cancelled == [STORM_CLIENTS]
    storm_workers = _workers_that_finished_requests(serve) - before
    assert set(storm_workers) == {0, 1}, storm_workers
