"""deploy/kubernetes/overlays/inference-pool, as `kubectl kustomize` renders
it: the Kubernetes kinds validate offline against the Kubernetes schemas,
the InferencePool and HTTPRoute against their published v1 APIs; one
`pagewire serve` per pod, pooled by the InferencePool on the port of its
OpenAI API and /metrics; the endpoint picker is the one the pool names,
watches that pool and reads metrics that pagewire's gateway serves."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pagewire.services.gateway.metrics import GatewayMetrics
from pagewire.v1 import engine_pb2
from tests.deploy.contract import IMAGE_UID, REPO, SCHEMA_VERSIONS, config_for
from tests.deploy.inference_gateway_api import HTTP_ROUTE, INFERENCE_POOL, duration_s, problems
from tests.deploy.kustomize import by_kind, pod_environment, render
from tests.support.harness import READINESS_SERVICE

OVERLAY = REPO / "deploy" / "kubernetes" / "overlays" / "inference-pool"
API_CHECKS = {"InferencePool": INFERENCE_POOL, "HTTPRoute": HTTP_ROUTE}
ENGINE_TYPE_LABEL = "inference.networking.k8s.io/engine-type"
# What each of the picker's metric specifications must name, in pagewire's
# exposition: the model-server protocol's gauge of that meaning.
PICKER_METRICS = {
    "queuedRequestsSpec": "vllm:num_requests_waiting",
    "runningRequestsSpec": "vllm:num_requests_running",
    "kvUsageSpec": "vllm:kv_cache_usage_perc",
    "loraSpec": "vllm:lora_requests_info",
    "cacheInfoSpec": "vllm:cache_config_info",
}


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return render(OVERLAY)


def the(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The one resource of `kind`, as a copy a test may change."""
    (resource,) = by_kind(resources, kind).values()
    return copy.deepcopy(resource)


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selected(match_labels: dict[str, str], deployments: dict[str, dict[str, Any]]) -> list[str]:
    """The Deployments whose pods carry every label of `match_labels`."""
    return sorted(name for name, d in deployments.items() if match_labels.items() <= pod_labels(d).items())


def flags(container: dict[str, Any]) -> dict[str, str]:
    """The container's `--name=value` arguments."""
    return dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])


def serve_config(resources: list[dict[str, Any]]) -> Any:
    container = container_of(by_kind(resources, "Deployment")["pagewire"])
    return config_for(container["args"], pod_environment(resources, container))


def api_group(resource: dict[str, Any]) -> str:
    return resource["apiVersion"].rsplit("/", 1)[0]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_kubernetes_kinds_validate_strictly(resources: list[dict[str, Any]], version: str) -> None:
    kinds = {r["kind"] for r in resources}
    core = {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"}
    assert kinds == core | {"ServiceAccount", "Role", "RoleBinding"} | API_CHECKS.keys()
    for resource in resources:
        if resource["kind"] in API_CHECKS:
            continue
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']}: {path}: {exc.message}")


@pytest.mark.parametrize("kind", API_CHECKS)
def test_pool_and_route_follow_their_published_v1_apis(resources: list[dict[str, Any]], kind: str) -> None:
    assert problems(the(resources, kind), API_CHECKS[kind]) == []


MISTAKES: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("InferencePool", lambda pool: pool.update(apiVersion="inference.networking.x-k8s.io/v1alpha2"), "is not one of"),
    ("InferencePool", lambda pool: pool["spec"].update(targetPortNumber=8000), "unknown field 'targetPortNumber'"),
    ("InferencePool", lambda pool: pool["spec"].update(selector={"app": "pagewire"}), "missing required field 'matchLabels'"),
    ("InferencePool", lambda pool: pool["spec"].pop("endpointPickerRef"), "missing required field 'endpointPickerRef'"),
    ("InferencePool", lambda pool: pool["spec"]["targetPorts"].append({"number": 8000}), "port number must be unique"),
    ("InferencePool", lambda pool: pool["spec"]["targetPorts"][0].update(number=80000), "80000 is above 65535"),
    ("InferencePool", lambda pool: pool["spec"].update(appProtocol="grpc"), "'grpc' is not one of"),
    ("InferencePool", lambda pool: pool["spec"]["endpointPickerRef"].pop("port"), "port is required when kind is 'Service'"),
    ("InferencePool", lambda pool: pool["spec"]["endpointPickerRef"].update(failureMode="Open"), "'Open' is not one of"),
    ("HTTPRoute", lambda route: route["spec"]["parentRefs"][0].pop("name"), "missing required field 'name'"),
    ("HTTPRoute", lambda route: route["spec"]["rules"][0]["backendRefs"][0].update(group="", kind="Service"), "Must have port for Service reference"),
    ("HTTPRoute", lambda route: route["spec"]["rules"][0]["matches"][0]["path"].update(value="v1"), "must be an absolute path"),
    ("HTTPRoute", lambda route: route["spec"]["rules"][0]["timeouts"].update(request="10 minutes"), "does not match"),
    ("HTTPRoute", lambda route: route["spec"]["rules"][0]["timeouts"].update(backendRequest="1h"), "backendRequest timeout cannot be longer"),
    ("HTTPRoute", lambda route: route["spec"]["rules"][0].update(backendRef=[]), "unknown field 'backendRef'"),
]


@pytest.mark.parametrize(("kind", "mistake", "expected"), MISTAKES, ids=[expected for _, _, expected in MISTAKES])
def test_the_api_check_refuses_a_mistake(
    resources: list[dict[str, Any]], kind: str, mistake: Callable[[dict[str, Any]], object], expected: str
) -> None:
    resource = the(resources, kind)
    mistake(resource)
    found = problems(resource, API_CHECKS[kind])
    assert any(expected in problem for problem in found), found


def test_namespace_is_consistent(resources: list[dict[str, Any]]) -> None:
    assert list(by_kind(resources, "Namespace")) == ["pagewire"]
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == "pagewire", resource["metadata"]["name"]


def test_one_pagewire_serve_per_pod(resources: list[dict[str, Any]]) -> None:
    deployments = by_kind(resources, "Deployment")
    assert set(deployments) == {"pagewire", "pagewire-epp"}, "the three tiers of the base are gone"
    deployment = deployments["pagewire"]
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    assert container["args"] == ["serve"]
    config = serve_config(resources)
    assert config.host == "0.0.0.0", "pods are reached by their IP: bind every interface"
    assert (config.port, config.http_port) == (50051, 8000)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": config.port, "http": config.http_port}

    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe_name]["grpc"]["port"] == config.port, probe_name
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    # The gateway is ready once it reaches its tokenizer and engine.
    assert container["readinessProbe"]["grpc"]["service"] == READINESS_SERVICE["gateway"]
    assert config.shutdown_grace_s < pod["terminationGracePeriodSeconds"], "draining must end before the kubelet's SIGKILL"

    assert config.device == "cuda"
    assert container["image"] == "pagewire:gpu"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1 == container["resources"]["limits"]["nvidia.com/gpu"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"]["claimName"] in by_kind(resources, "PersistentVolumeClaim")

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()

    pdb = by_kind(resources, "PodDisruptionBudget")["pagewire"]
    assert selected(pdb["spec"]["selector"]["matchLabels"], deployments) == ["pagewire"]
    assert pdb["spec"]["maxUnavailable"] == 1


def test_grpc_service_reaches_every_serve_pod(resources: list[dict[str, Any]]) -> None:
    service = by_kind(resources, "Service")["pagewire"]
    assert service["spec"]["clusterIP"] == "None", "clients spread their streams over the pods' own addresses"
    assert selected(service["spec"]["selector"], by_kind(resources, "Deployment")) == ["pagewire"]
    named = {p["name"]: p["containerPort"] for p in container_of(by_kind(resources, "Deployment")["pagewire"])["ports"]}
    assert {port["port"]: named[port["targetPort"]] for port in service["spec"]["ports"]} == {50051: 50051, 8000: 8000}


def test_pool_routes_to_the_openai_port_of_the_serve_pods(resources: list[dict[str, Any]]) -> None:
    pool = the(resources, "InferencePool")
    deployments = by_kind(resources, "Deployment")
    assert selected(pool["spec"]["selector"]["matchLabels"], deployments) == ["pagewire"]
    config = serve_config(resources)
    # One endpoint per pod: the OpenAI API, where /metrics is served too,
    # which the picker scrapes on the first target port.
    assert pool["spec"]["targetPorts"] == [{"number": config.http_port}]
    assert pool["spec"]["appProtocol"] == "http"
    annotations = deployments["pagewire"]["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(config.http_port), "/metrics")


def test_pool_names_the_endpoint_picker_that_watches_it(resources: list[dict[str, Any]]) -> None:
    pool = the(resources, "InferencePool")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["kind"] == "Service"
    service = by_kind(resources, "Service")[ref["name"]]
    deployments = by_kind(resources, "Deployment")
    assert selected(service["spec"]["selector"], deployments) == ["pagewire-epp"]
    picker = container_of(deployments["pagewire-epp"])
    container_ports = {p["name"]: p["containerPort"] for p in picker["ports"]}
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    # The picker serves ext-proc on its default --grpc-port.
    assert container_ports[port["targetPort"]] == 9002
    assert ref["failureMode"] == "FailOpen"

    assert picker["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:v1.")
    args = flags(picker)
    assert (args["pool-name"], args["pool-group"]) == (pool["metadata"]["name"], api_group(pool))
    # Read from the pod's own namespace, which is the pool's.
    assert args["pool-namespace"] == "$(NAMESPACE)"
    (namespace_env,) = [e for e in picker["env"] if e["name"] == "NAMESPACE"]
    assert namespace_env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"

    role = by_kind(resources, "Role")["pagewire-epp"]
    readable = {(group, resource) for rule in role["rules"] if {"get", "list", "watch"} <= set(rule["verbs"]) for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {("", "pods"), (api_group(pool), "inferencepools")} <= readable
    binding = by_kind(resources, "RoleBinding")["pagewire-epp"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    service_account = deployments["pagewire-epp"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account, "namespace": pool["metadata"]["namespace"]}]
    assert service_account in by_kind(resources, "ServiceAccount")


def picker_config(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """The EndpointPickerConfig the picker reads: its --config-file, in the
    ConfigMap mounted at that file's directory."""
    deployment = by_kind(resources, "Deployment")["pagewire-epp"]
    path = flags(container_of(deployment))["config-file"]
    directory, name = path.rsplit("/", 1)
    (mount,) = [m for m in container_of(deployment)["volumeMounts"] if m["mountPath"] == directory]
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    return yaml.safe_load(by_kind(resources, "ConfigMap")[volume["configMap"]["name"]]["data"][name])


def served_metric_names() -> set[str]:
    """The metric families of a gateway whose one replica has reported."""
    metrics = GatewayMetrics()
    metrics.observe_stats("10.0.0.1:50053", engine_pb2.EngineStats(), engine_pb2.EngineInfo(block_size=16, num_kv_blocks=64))
    return {family.name for family in text_string_to_metric_families(metrics.render().decode())}


def test_endpoint_picker_reads_the_metrics_pagewire_serves(resources: list[dict[str, Any]]) -> None:
    config = picker_config(resources)
    assert (config["apiVersion"], config["kind"]) == ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig")
    plugins = {plugin.get("name", plugin["type"]): plugin for plugin in config["plugins"]}

    source = plugins["metrics-data-source"]["parameters"]
    assert (source["scheme"], source["path"]) == ("http", "/metrics")
    assert config["dataLayer"]["sources"] == [{"pluginRef": "metrics-data-source", "extractors": [{"pluginRef": "core-metrics-extractor"}]}]

    # The serve pods name the engine configuration they are read with.
    engine_type = pod_labels(by_kind(resources, "Deployment")["pagewire"])[ENGINE_TYPE_LABEL]
    extractor = plugins["core-metrics-extractor"]["parameters"]
    (engine,) = [e for e in extractor["engineConfigs"] if e["name"] == engine_type]
    specs = {key: value for key, value in engine.items() if key != "name"}
    assert specs == PICKER_METRICS
    assert set(specs.values()) <= served_metric_names()

    (profile,) = config["schedulingProfiles"]
    assert {p["pluginRef"] for p in profile["plugins"]} == {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"} <= plugins.keys()


def test_http_route_sends_the_openai_api_to_the_pool(resources: list[dict[str, Any]]) -> None:
    pool = the(resources, "InferencePool")
    route = the(resources, "HTTPRoute")
    (parent,) = route["spec"]["parentRefs"]
    assert (parent["group"], parent["kind"]) == ("gateway.networking.k8s.io", "Gateway")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": api_group(pool), "kind": "InferencePool", "name": pool["metadata"]["name"]}]
    (match,) = rule["matches"]
    assert match["path"] == {"type": "PathPrefix", "value": "/v1"}
    assert duration_s(rule["timeouts"]["request"]) >= 300, "streamed generations outlast a gateway's default timeout"


def test_every_pod_is_covered_by_one_network_policy_on_its_served_ports(resources: list[dict[str, Any]]) -> None:
    deployments = by_kind(resources, "Deployment")
    policies = by_kind(resources, "NetworkPolicy")
    assert set(policies) == set(deployments)
    for name, policy in policies.items():
        assert policy["spec"]["policyTypes"] == ["Ingress"], name
        assert set(policy["spec"]["podSelector"]) == {"matchLabels"}, name
        assert selected(policy["spec"]["podSelector"]["matchLabels"], deployments) == [name], name

    def allowed(name: str) -> set[tuple[str, int]]:
        (rule,) = policies[name]["spec"]["ingress"]
        # The gateway's proxies and the picker's scrapes come from namespaces
        # this overlay cannot name.
        assert not rule.get("from"), name
        return {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}

    serve_ports = {("TCP", p["containerPort"]) for p in container_of(deployments["pagewire"])["ports"]}
    assert allowed("pagewire") == serve_ports == {("TCP", 50051), ("TCP", 8000)}
    picker_ports = {p["name"]: p["containerPort"] for p in container_of(deployments["pagewire-epp"])["ports"]}
    ext_proc = {("TCP", picker_ports[p["targetPort"]]) for p in by_kind(resources, "Service")["pagewire-epp"]["spec"]["ports"]}
    assert allowed("pagewire-epp") == ext_proc == {("TCP", 9002)}
