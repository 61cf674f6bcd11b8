"""Render a kustomization the way `kubectl apply -k` would, for the subset of
kustomize that deploy/kubernetes uses: `resources` (files and directories),
`namespace`, and `patches` given as strategic-merge patch files. Any other
key is refused, so a manifest cannot quietly depend on a feature this
renderer would ignore."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "patches"}

# Strategic-merge keys of the lists the manifests patch (from the Kubernetes
# API's x-kubernetes-patch-merge-key); other lists are replaced whole.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "tolerations": "key",
}

# Kinds without a namespace: the `namespace` transformer leaves them alone.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        merged_list = list(base)
        for item in patch:
            index = next((i for i, existing in enumerate(merged_list) if existing.get(key) == item.get(key)), None)
            if index is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[index] = strategic_merge(merged_list[index], item)
        return merged_list
    return copy.deepcopy(patch)


def _identity(resource: dict[str, Any]) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources of the kustomization in `directory`, patched and namespaced."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KEYS
    if unsupported:
        raise ValueError(f"{directory}/kustomization.yaml uses {sorted(unsupported)}, which this renderer does not implement")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources.extend(render(path) if path.is_dir() else load_documents(path))
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ValueError(f"only `patches: - path: FILE` is supported, not {patch_entry}")
        for patch in load_documents(directory / patch_entry["path"]):
            matches = [i for i, r in enumerate(resources) if _identity(r) == _identity(patch)]
            if len(matches) != 1:
                raise ValueError(f"patch {patch_entry['path']} matches {len(matches)} resources named {_identity(patch)}")
            if patch.get("$patch") == "delete":
                del resources[matches[0]]
            else:
                resources[matches[0]] = strategic_merge(resources[matches[0]], patch)
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = kustomization["namespace"]
    return resources


def by_kind(resources: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def pod_environment(resources: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The variables a container gets from its envFrom ConfigMaps and env."""
    config_maps = by_kind(resources, "ConfigMap")
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environment.update(config_maps[source["configMapRef"]["name"]]["data"])
    environment.update({e["name"]: e["value"] for e in container.get("env", [])})
    return environment
