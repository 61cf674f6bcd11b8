from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from services.common.config import ServiceConfig, add_config_arguments, config_from_args, option


@dataclass
class ExampleConfig(ServiceConfig):
    max_num_seqs: int = option(256, "Most sequences per step.")
    max_model_len: int | None = option(None, "Context length.")
    enable_prefix_caching: bool = option(True, "Prefix caching.")
    engine: list[str] = option([], "Engine address, repeatable.")


def _parse(argv: list[str], env: dict[str, str]) -> ExampleConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleConfig)
    return config_from_args(ExampleConfig, parser.parse_args(argv), env)


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
