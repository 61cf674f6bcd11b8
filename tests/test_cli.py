from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest

from pagewire.services.cli import SERVICES, build_parser, installed_version


@pytest.mark.parametrize("command", [*SERVICES, "health"])
def test_every_subcommand_has_help(command: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pagewire.services.cli", command, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: pagewire" in done.stdout


def test_version_is_the_installed_distributions() -> None:
    done = subprocess.run([sys.executable, "-m", "pagewire.services.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"pagewire {importlib.metadata.version('pagewire')}"


def test_a_source_tree_without_an_installed_distribution_still_builds_every_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine that runs the tree from PYTHONPATH, with nothing installed."""

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert "not installed" in installed_version()
    parser, _ = build_parser()
    assert parser.parse_args(["serve"]).command == "serve"


def test_unknown_model_exits_with_an_actionable_message(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pagewire.services.cli", "tokenizer", "--model", str(tmp_path / "nope"), "--port", "0", "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "neither a .gguf file nor a HF directory" in done.stderr


def test_unsupported_architecture_is_refused_at_start(tmp_path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "falcon", "architectures": ["FalconForCausalLM"]}')
    done = subprocess.run(
        [sys.executable, "-m", "pagewire.services.cli", "engine", "--model", str(tmp_path), "--port", "0", "--device", "cpu", "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    # The last word is one log record naming the architecture and what is supported, not a traceback.
    last = json.loads((done.stdout + done.stderr).strip().splitlines()[-1])
    assert last["event"] == "engine stopped: the model did not load"
    assert "model type 'falcon' is not supported (supported: llama, mistral, mixtral, qwen2, qwen3, qwen3_moe)" in last["reason"]
