"""What deployment files must agree with: the `pagewire` CLI (subcommands,
config fields and their PAGEWIRE_* variables, default ports), the image's
user and the Kubernetes releases the manifests target. The gRPC
service names that health readiness is reported under are
tests.support.harness.READINESS_SERVICE."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from pagewire.services.cli import build_parser
from pagewire.services.common.config import env_name

REPO = Path(__file__).resolve().parents[2]
# The image's USER (Dockerfile); pods must run as it.
IMAGE_UID = 10001
# The Kubernetes releases whose schemas the manifests validate against.
SCHEMA_VERSIONS = ["1.30", "1.35"]


def config_class(subcommand: str) -> type:
    """The CONFIG dataclass behind `pagewire SUBCOMMAND`; skips while that
    service is not registered in the CLI yet."""
    _, modules = build_parser()
    if subcommand not in modules:
        pytest.skip(f"`pagewire {subcommand}` is not registered in services/cli.py yet")
    return modules[subcommand].CONFIG  # type: ignore[attr-defined]


def config_for(command: list[str], environment: Mapping[str, str]) -> Any:
    """The config `pagewire COMMAND...` builds in `environment`, after checking
    that every PAGEWIRE_* variable there names a field of that service."""
    from pagewire.services.common.config import config_from_args

    config_cls = config_class(command[0])
    args = build_parser()[0].parse_args(command)
    known = {env_name(f.name) for f in dataclasses.fields(config_cls)}
    unknown = sorted(name for name in environment if name.startswith("PAGEWIRE_") and name not in known)
    assert not unknown, f"`pagewire {args.command}` has no setting for {unknown}"
    return config_from_args(config_cls, args, environment)


def parse_health_command(argv: list[str]) -> Any:
    """The parsed `pagewire health ...` arguments of a probe command line."""
    assert argv[0] == "pagewire", argv
    args = build_parser()[0].parse_args(argv[1:])
    assert args.command == "health"
    return args
