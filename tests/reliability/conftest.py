"""One tokenizer, engine and gateway process for all reliability tests, and
the figures each test records: printed at the end of the run and written as
JSON (to $PAGEWIRE_RELIABILITY_SUMMARY, else .pytest_cache/d/reliability/)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.settings import ENGINE_ARGS, GATEWAY_ARGS, TOKENIZER_ARGS
from tests.support.harness import Cluster

_figures: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster.create(tmp_path_factory.mktemp("reliability-logs"), tokenizer_args=TOKENIZER_ARGS, engine_args=ENGINE_ARGS, gateway_args=GATEWAY_ARGS)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture
def serving_cluster(cluster: Cluster) -> Cluster:
    """The cluster with every process up and ready (a fault test before may have killed one)."""
    cluster.start()
    return cluster


@pytest.fixture
def record_figures(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Call with the figures of this test (a JSON-able dict)."""

    def record(figures: dict[str, Any]) -> None:
        _figures[request.node.name] = figures

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config) -> None:
    if not _figures:
        return
    terminalreporter.section("reliability figures")
    for name, figures in _figures.items():
        terminalreporter.write_line(f"{name}: {json.dumps(figures, sort_keys=True)}")
    target = os.environ.get("PAGEWIRE_RELIABILITY_SUMMARY")
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    if target or cache is not None:
        path = Path(target) if target else cache.mkdir("reliability") / "summary.json"
        path.write_text(json.dumps(_figures, indent=2, sort_keys=True) + "\n")
        terminalreporter.write_line(f"written to {path}")
