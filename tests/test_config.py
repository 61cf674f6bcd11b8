from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TypeVar

import pytest

from pagewire.services.cli import build_parser
from pagewire.services.common.config import ServiceConfig, add_config_arguments, config_from_args, option
from pagewire.services.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig

C = TypeVar("C")


@dataclass
class ExampleConfig(ServiceConfig):
    max_num_seqs: int = option(256, "Most sequences per step.")
    max_model_len: int | None = option(None, "Context length.")
    enable_prefix_caching: bool = option(True, "Prefix caching.")
    engine: list[str] = option([], "Engine address, repeatable.")


def _parse_as(config_cls: type[C], argv: list[str], env: dict[str, str]) -> C:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, config_cls)
    return config_from_args(config_cls, parser.parse_args(argv), env)


def _parse(argv: list[str], env: dict[str, str]) -> ExampleConfig:
    return _parse_as(ExampleConfig, argv, env)


def test_flag_beats_environment_beats_default() -> None:
    assert _parse([], {}).max_num_seqs == 256
    assert _parse([], {"PAGEWIRE_MAX_NUM_SEQS": "8"}).max_num_seqs == 8
    assert _parse(["--max-num-seqs", "4"], {"PAGEWIRE_MAX_NUM_SEQS": "8"}).max_num_seqs == 4


def test_optional_bool_and_list_fields() -> None:
    cfg = _parse(["--no-enable-prefix-caching", "--engine", "a:1", "--engine", "b:2"], {"PAGEWIRE_MAX_MODEL_LEN": "512"})
    assert cfg.enable_prefix_caching is False
    assert cfg.engine == ["a:1", "b:2"]
    assert cfg.max_model_len == 512
    assert _parse([], {"PAGEWIRE_ENGINE": "x:1, y:2", "PAGEWIRE_ENABLE_PREFIX_CACHING": "false"}).engine == ["x:1", "y:2"]


def test_bad_environment_value_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="PAGEWIRE_MAX_NUM_SEQS"):
        _parse([], {"PAGEWIRE_MAX_NUM_SEQS": "many"})
    with pytest.raises(SystemExit, match="PAGEWIRE_LOG_LEVEL"):
        _parse([], {"PAGEWIRE_LOG_LEVEL": "loud"})


def test_gateway_api_key_flag_and_environment_fill_the_same_field(capsys: pytest.CaptureFixture[str]) -> None:
    parser, modules = build_parser()
    with pytest.raises(SystemExit) as helped:
        parser.parse_args(["gateway", "--help"])
    assert helped.value.code == 0
    assert "--api-key" in capsys.readouterr().out

    def gateway(argv: list[str], env: dict[str, str]) -> str:
        # As `pagewire gateway` builds its config.
        return config_from_args(modules["gateway"].CONFIG, parser.parse_args(["gateway", *argv]), env).api_key  # type: ignore[attr-defined]

    assert gateway([], {}) == ""
    assert gateway(["--api-key", "sk-flag"], {}) == "sk-flag"
    assert gateway([], {"PAGEWIRE_API_KEY": "sk-env"}) == "sk-env"
    assert gateway(["--api-key", "sk-flag"], {"PAGEWIRE_API_KEY": "sk-env"}) == "sk-flag"


def test_engine_kv_cache_flags_and_unset_token_budget() -> None:
    defaults = _parse_as(EngineConfig, [], {})
    assert defaults.kv_cache_memory == DEFAULT_CPU_KV_CACHE_BYTES == 1 << 30
    # Unset, so the engine picks the budget for its device (tests/engine/test_engine_core.py).
    assert defaults.max_num_batched_tokens is None and defaults.num_kv_blocks is None
    cfg = _parse_as(EngineConfig, ["--kv-cache-memory", "5000000", "--num-kv-blocks", "7"], {"PAGEWIRE_MAX_NUM_BATCHED_TOKENS": "512"})
    assert (cfg.kv_cache_memory, cfg.num_kv_blocks, cfg.max_num_batched_tokens) == (5_000_000, 7, 512)
    assert _parse_as(EngineConfig, [], {"PAGEWIRE_NUM_KV_BLOCKS": ""}).num_kv_blocks is None
