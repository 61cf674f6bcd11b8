"""deploy/kubernetes: every rendered overlay validates against Kubernetes 1.3x
schemas (offline, strict) and agrees with the CLI, the protos, the
gateway's metrics and, in its NetworkPolicies, with its own pods and ports."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from pagewire.services.gateway.discovery import DnsTarget, parse_target
from pagewire.services.gateway.metrics import GatewayMetrics
from tests.deploy.contract import IMAGE_UID, REPO, SCHEMA_VERSIONS, config_for
from tests.deploy.kustomize import by_kind, pod_environment, render
from tests.support.harness import READINESS_SERVICE

KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ["cpu", "gpu", "gpu-tp2"]


# Ids are not the bare overlay names: a test keyword "gpu" marks GPU-only tests.
@pytest.fixture(scope="module", params=OVERLAYS, ids=lambda name: f"{name}-overlay")
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUBERNETES / "overlays" / request.param)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_resource_validates_strictly(overlay: tuple[str, list[dict[str, Any]]], version: str) -> None:
    _, resources = overlay
    kinds = {r["kind"] for r in resources}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {exc.message}")


def test_validation_rejects_a_broken_manifest() -> None:
    engine = by_kind(render(KUBERNETES / "overlays" / "cpu"), "Deployment")["engine"]
    engine["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(engine, SCHEMA_VERSIONS[0], strict=True)


def test_namespace_is_consistent(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    namespaces = by_kind(resources, "Namespace")
    assert list(namespaces) == ["pagewire"]
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "pagewire", resource["metadata"]["name"]


@pytest.mark.parametrize("component", ["tokenizer", "engine", "gateway"])
def test_deployment_agrees_with_cli(overlay: tuple[str, list[dict[str, Any]]], component: str) -> None:
    _, resources = overlay
    deployment = by_kind(resources, "Deployment")[component]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    environment = pod_environment(resources, container)
    config = config_for(container["args"], environment)
    assert config.host == "0.0.0.0", "pods are reached by their IP: bind every interface"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == config.port
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[probe_name]
        assert probe["grpc"]["port"] == config.port, probe_name
    assert container["readinessProbe"]["grpc"]["service"] == READINESS_SERVICE[component]
    # Liveness asks about the server as a whole: a draining or loading
    # service is not ready, but it is alive.
    assert container["livenessProbe"]["grpc"].get("service", "") == ""

    assert config.shutdown_grace_s < pod["terminationGracePeriodSeconds"], "draining must end before the kubelet's SIGKILL"

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_engine_startup_probe_allows_model_loading(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    (container,) = by_kind(resources, "Deployment")["engine"]["spec"]["template"]["spec"]["containers"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_services_select_their_pods_and_ports(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    deployments = by_kind(resources, "Deployment")
    services = by_kind(resources, "Service")
    assert set(services) == {"tokenizer", "engine-headless", "gateway"}
    assert services["engine-headless"]["spec"]["clusterIP"] == "None"
    for service in services.values():
        selected = [d for d in deployments.values() if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        (container,) = selected[0]["spec"]["template"]["spec"]["containers"]
        named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert named_ports[port["targetPort"]] == port["port"], service["metadata"]["name"]


def test_gateway_finds_tokenizer_and_every_engine_pod(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    services = by_kind(resources, "Service")
    (gateway,) = by_kind(resources, "Deployment")["gateway"]["spec"]["template"]["spec"]["containers"]
    config = config_for(gateway["args"], pod_environment(resources, gateway))

    tokenizer = services["tokenizer"]
    assert config.tokenizer == [f"tokenizer.{tokenizer['metadata']['namespace']}.svc:{tokenizer['spec']['ports'][0]['port']}"]

    headless = services["engine-headless"]
    (target,) = [parse_target(t) for t in config.engine]
    assert target == DnsTarget(f"engine-headless.{headless['metadata']['namespace']}.svc", headless["spec"]["ports"][0]["port"])


def test_gateway_metrics_are_scraped_from_the_rest_port(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    template = by_kind(resources, "Deployment")["gateway"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    config = config_for(container["args"], pod_environment(resources, container))
    annotations = template["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.http_port
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["http"] == config.http_port


def _gauge_labels(name: str) -> tuple[str, ...]:
    # The per-replica gauges are computed at scrape time from the engines' last figures.
    (family,) = [m for m in GatewayMetrics().replicas.collect() if m.name == name]
    return tuple(family._labelnames)


def test_engine_autoscaler_scales_on_the_gateway_queue_metric(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    hpa = by_kind(resources, "HorizontalPodAutoscaler")["engine"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "engine"}
    assert hpa["spec"]["minReplicas"] >= 2
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods_metrics == ["pagewire_requests_waiting"]
    assert "replica" in _gauge_labels("pagewire_requests_waiting")
    fallback = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert fallback == ["cpu"]

    adapter = yaml.safe_load((KUBERNETES / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == "pagewire_requests_waiting"
    assert rule["seriesQuery"].startswith("pagewire_requests_waiting{")
    assert '"replica"' in rule["metricsQuery"]


def test_engine_disruption_budget_covers_engine_pods(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    pdb = by_kind(resources, "PodDisruptionBudget")["engine"]
    engine_labels = by_kind(resources, "Deployment")["engine"]["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= engine_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def test_overlays_pick_the_engine_device(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, resources = overlay
    pod = by_kind(resources, "Deployment")["engine"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = config_for(container["args"], pod_environment(resources, container))
    resources_spec = container["resources"]
    models_volume = next(v for v in pod["volumes"] if v["name"] == "models")
    claims = by_kind(resources, "PersistentVolumeClaim")
    if name.startswith("gpu"):
        assert config.device == "cuda"
        assert container["image"] == "pagewire:gpu"
        # One GPU per rank: the gpu-tp2 overlay splits each engine over two.
        assert config.tensor_parallel_size == (2 if name == "gpu-tp2" else 1)
        gpus = config.tensor_parallel_size
        assert resources_spec["requests"]["nvidia.com/gpu"] == gpus == resources_spec["limits"]["nvidia.com/gpu"]
        assert models_volume["persistentVolumeClaim"]["claimName"] in claims
    else:
        assert config.device == "cpu"
        assert container["image"] == "pagewire:cpu"
        assert "nvidia.com/gpu" not in resources_spec["requests"]
        assert set(models_volume) == {"name", "hostPath"}
        assert not claims


def test_tokenizer_and_engines_load_one_model_from_the_models_volume(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    deployments = by_kind(resources, "Deployment")
    models = set()
    for component in ("tokenizer", "engine"):
        (container,) = deployments[component]["spec"]["template"]["spec"]["containers"]
        models.add(config_for(container["args"], pod_environment(resources, container)).model)
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
        assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    assert len(models) == 1


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _selected(selector: dict[str, Any], deployments: dict[str, dict[str, Any]]) -> list[str]:
    """The Deployments whose pods `selector` (a LabelSelector) selects."""
    # matchLabels only, so that a subset check is the whole match.
    assert set(selector) == {"matchLabels"}, selector
    return sorted(name for name, d in deployments.items() if selector["matchLabels"].items() <= _pod_labels(d).items())


def _pod_ports(resources: list[dict[str, Any]], component: str) -> set[tuple[str, int]]:
    """(protocol, port) of `component`'s container ports, after checking that
    they are exactly the ports its Services send to."""
    deployments = by_kind(resources, "Deployment")
    (container,) = deployments[component]["spec"]["template"]["spec"]["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    container_ports = {(p.get("protocol", "TCP"), p["containerPort"]) for p in container["ports"]}
    service_ports = {
        (port.get("protocol", "TCP"), named.get(port["targetPort"], port["targetPort"]))
        for service in by_kind(resources, "Service").values()
        if _selected({"matchLabels": service["spec"]["selector"]}, deployments) == [component]
        for port in service["spec"]["ports"]
    }
    assert service_ports == container_ports, component
    return container_ports


def _policy_ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}


def test_every_pod_is_covered_by_one_network_policy(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    deployments = by_kind(resources, "Deployment")
    policies = by_kind(resources, "NetworkPolicy")
    for name, policy in policies.items():
        assert policy["apiVersion"] == "networking.k8s.io/v1"
        # Ingress only: the gateway must still reach the tokenizer, the
        # engines and DNS.
        assert policy["spec"]["policyTypes"] == ["Ingress"], name
        assert _selected(policy["spec"]["podSelector"], deployments) == [name], name
    assert set(policies) == set(deployments)


@pytest.mark.parametrize("component", ["tokenizer", "engine"])
def test_backends_accept_only_gateway_pods_on_their_grpc_port(overlay: tuple[str, list[dict[str, Any]]], component: str) -> None:
    _, resources = overlay
    deployments = by_kind(resources, "Deployment")
    policy = by_kind(resources, "NetworkPolicy")[component]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    # A bare podSelector: pods of the policy's own namespace, no ipBlock or
    # namespaceSelector widening it.
    assert set(peer) == {"podSelector"}, peer
    assert _selected(peer["podSelector"], deployments) == ["gateway"]
    assert _policy_ports(rule) == _pod_ports(resources, component)

    (container,) = deployments[component]["spec"]["template"]["spec"]["containers"]
    config = config_for(container["args"], pod_environment(resources, container))
    assert _policy_ports(rule) == {("TCP", config.port)}, "the gRPC port the service listens on"


def test_gateway_accepts_its_public_ports_from_anywhere(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, resources = overlay
    template = by_kind(resources, "Deployment")["gateway"]["spec"]["template"]
    (container,) = template["spec"]["containers"]
    config = config_for(container["args"], pod_environment(resources, container))
    (rule,) = by_kind(resources, "NetworkPolicy")["gateway"]["spec"]["ingress"]
    assert not rule.get("from"), "clients and Prometheus come from anywhere"
    assert _policy_ports(rule) == _pod_ports(resources, "gateway") == {("TCP", config.port), ("TCP", config.http_port)}
    assert ("TCP", int(template["metadata"]["annotations"]["prometheus.io/port"])) in _policy_ports(rule)


def test_validation_rejects_a_broken_network_policy() -> None:
    policy = by_kind(render(KUBERNETES / "overlays" / "cpu"), "NetworkPolicy")["engine"]
    policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabel"] = {"app.kubernetes.io/component": "gateway"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(policy, SCHEMA_VERSIONS[0], strict=True)
