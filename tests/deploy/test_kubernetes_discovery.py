"""Engine discovery as on Kubernetes, with local processes for pods: each
process gets its container's environment from the rendered cpu overlay (the
model ConfigMap naming a model on the models volume), and a file the test
edits stands in for the headless Service's DNS records (`file:///...`
instead of `dns:///engine-headless...`). Pods are deleted the way the
kubelet does it: SIGTERM, and out of the records at the same time."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from pagewire.services.common.grpc_utils import check_health
from tests.deploy.cluster import SteadyLoad, complete, finished_requests, resolve_mounts, rest_client, rewrite_addresses, service_process
from tests.deploy.contract import REPO, config_for
from tests.deploy.kustomize import by_kind, pod_environment, render
from tests.support.harness import STOP_TIMEOUT_S, ServiceProcess, engine_stats, start_all, stop_all, wait_until

# Fast re-resolution keeps the test short; pods use the configured interval.
DISCOVERY_INTERVAL_S = "0.2"
WAIT_S = 60.0
# Outlasts deleting its pod and a few short requests elsewhere.
LONG_REQUEST_TOKENS = 1500


@dataclass
class PodCluster:
    tokenizer: ServiceProcess
    engines: list[ServiceProcess]
    gateway: ServiceProcess
    endpoints: Path

    def publish(self, *ready: ServiceProcess) -> None:
        """The engine pods the headless Service now resolves to (replaced atomically, as DNS answers are)."""
        staged = self.endpoints.with_suffix(".staged")
        staged.write_text("".join(f"{engine.address}\n" for engine in ready))
        os.replace(staged, self.endpoints)

    def delete_pod(self, engine: ServiceProcess, *remaining: ServiceProcess) -> None:
        engine.signal(signal.SIGTERM)
        self.publish(*remaining)


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[PodCluster]:
    resources = render(REPO / "deploy" / "kubernetes" / "overlays" / "cpu")
    deployments = by_kind(resources, "Deployment")
    log_dir = tmp_path_factory.mktemp("pods")

    config_maps = by_kind(resources, "ConfigMap")
    config_maps["pagewire-model"]["data"]["PAGEWIRE_MODEL"] = "/models/tiny"

    def container(component: str) -> tuple[list[str], dict[str, str]]:
        (spec,) = deployments[component]["spec"]["template"]["spec"]["containers"]
        mounts = {m["mountPath"]: models_dir for m in spec.get("volumeMounts", []) if m["name"] == "models"}
        return spec["args"], {key: resolve_mounts(value, mounts) for key, value in pod_environment(resources, spec).items()}

    tokenizer_args, tokenizer_env = container("tokenizer")
    tokenizer = service_process("tokenizer", tokenizer_args, tokenizer_env, log_dir)
    engine_args, engine_env = container("engine")
    engines = [service_process(f"engine-{i}", engine_args, engine_env, log_dir) for i in range(3)]

    gateway_args, gateway_env = container("gateway")
    tokenizer_service = by_kind(resources, "Service")["tokenizer"]
    tokenizer_dns = f"tokenizer.{tokenizer_service['metadata']['namespace']}.svc:{config_for(tokenizer_args, tokenizer_env).port}"
    endpoints = log_dir / "engine-headless.endpoints"
    gateway_env = {
        **gateway_env,
        "PAGEWIRE_TOKENIZER": rewrite_addresses(gateway_env["PAGEWIRE_TOKENIZER"], {tokenizer_dns: tokenizer.address}),
        "PAGEWIRE_ENGINE": f"file://{endpoints}",
        "PAGEWIRE_DISCOVERY_INTERVAL_S": DISCOVERY_INTERVAL_S,
    }
    gateway = service_process("gateway", gateway_args, gateway_env, log_dir)
    cluster = PodCluster(tokenizer, engines, gateway, endpoints)
    cluster.publish(*engines[:2])
    processes = [tokenizer, *engines, gateway]
    try:
        start_all(processes)
        yield cluster
    finally:
        stop_all(processes)


def test_gateway_follows_engine_pods_as_they_come_and_go(pods: PodCluster) -> None:
    first, second, newcomer = pods.engines
    with SteadyLoad(pods.gateway) as load:
        wait_until(lambda: finished_requests(first) > 0 and finished_requests(second) > 0, "both listed pods served requests", WAIT_S)
        pods.delete_pod(first, second)
        pods.publish(second, newcomer)
        wait_until(lambda: finished_requests(newcomer) > 0, "the new pod served requests", WAIT_S)
        settled = load.succeeded
        wait_until(lambda: load.succeeded >= settled + 6, "more requests succeeded", WAIT_S)
    assert first.process is not None and first.process.wait(STOP_TIMEOUT_S) == 0
    assert load.failures == []
    assert finished_requests(second) > 0 and finished_requests(newcomer) > 0


def test_a_deleted_pod_finishes_its_requests_and_gets_no_new_ones(pods: PodCluster) -> None:
    serving = [engine for engine in pods.engines if engine.alive]
    assert len(serving) == 2
    pods.publish(*serving)
    with rest_client(pods.gateway) as client, ThreadPoolExecutor(1) as pool:
        long_request = pool.submit(complete, client, "Count slowly from one to a thousand:", LONG_REQUEST_TOKENS, True)
        wait_until(lambda: any(engine_stats(e.address).load.num_running for e in serving), "the long request is running", WAIT_S)
        draining, other = sorted(serving, key=lambda e: engine_stats(e.address).load.num_running, reverse=True)
        other_before = finished_requests(other)
        pods.delete_pod(draining, other)
        wait_until(lambda: not check_health(draining.address, draining.readiness_service), "the deleted pod reports NOT_SERVING", WAIT_S)
        for n in range(4):
            complete(client, f"What is {n} plus {n}?")
        assert draining.alive, "the long request should still be running: make it longer"
        assert finished_requests(other) == other_before + 4, "a draining pod must get no new requests"
        assert long_request.result(WAIT_S)["usage"]["completion_tokens"] == LONG_REQUEST_TOKENS
    assert draining.process is not None and draining.process.wait(STOP_TIMEOUT_S) == 0
