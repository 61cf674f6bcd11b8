"""`pagewire serve`: the children's command lines, a child that dies, and a
gateway that serves TLS."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from pagewire.services.cli import build_parser
from pagewire.services.common.config import config_from_args, parse_config
from pagewire.services.common.grpc_utils import check_health
from pagewire.services.common.tls import TlsFiles
from pagewire.services.launcher import CONFIG, ChildCommand, child_commands
from tests.support.certificates import self_signed_certificate
from tests.support.harness import ServeProcess

# Seconds `pagewire serve` on the embedded model gets to say it is serving.
TLS_READY_S = 120.0


@pytest.fixture
def no_pagewire_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve and the children it is asked about see no developer's PAGEWIRE_* variables."""
    for name in [name for name in os.environ if name.startswith("PAGEWIRE_")]:
        monkeypatch.delenv(name)


def flags_of(command: ChildCommand) -> list[str]:
    assert command.argv[:3] == [sys.executable, "-m", "pagewire.services.cli"]
    return command.argv[3:]


@pytest.mark.usefixtures("no_pagewire_environment")
def test_children_get_their_ports_and_only_the_engine_options_given() -> None:
    config = parse_config(
        CONFIG,
        ["--port", "7001", "--http-port", "7002", "--tokenizer-port", "7003", "--engine-port", "7004", "--model", "/models/m.gguf"]
        + ["--device", "cpu", "--max-model-len", "1024", "--no-enable-prefix-caching", "--log-format", "json"],
    )
    commands = {name: flags_of(command) for name, command in child_commands(config).items()}
    assert list(commands) == ["tokenizer", "engine", "gateway"]

    tokenizer = commands["tokenizer"]
    assert tokenizer[:5] == ["tokenizer", "--host", "127.0.0.1", "--port", "7003"]
    assert tokenizer[tokenizer.index("--model") + 1] == "/models/m.gguf"

    engine = " ".join(commands["engine"])
    assert engine.startswith("engine --host 127.0.0.1 --port 7004 ")
    for passed in ("--model /models/m.gguf", "--device cpu", "--max-model-len 1024", "--no-enable-prefix-caching", "--log-format json"):
        assert passed in engine
    # Options left at the engine's defaults are the engine's to choose.
    assert "--block-size" not in engine and "--dtype" not in engine

    gateway = " ".join(commands["gateway"])
    for passed in ("--port 7001", "--http-port 7002", "--tokenizer 127.0.0.1:7003", "--engine 127.0.0.1:7004"):
        assert passed in gateway
    assert "--model" not in gateway and "--device" not in gateway


def _as_the_child_parses_it(command: ChildCommand, environ: dict[str, str]) -> Any:
    """The config `pagewire <child>` builds from this command line and environment."""
    parser, modules = build_parser()
    args = parser.parse_args(flags_of(command))
    return config_from_args(modules[args.command].CONFIG, args, environ | command.env)  # type: ignore[attr-defined]


@pytest.mark.usefixtures("no_pagewire_environment")
def test_gateway_options_given_to_serve_reach_the_gateways_config() -> None:
    argv = ["--max-concurrent-requests", "3", "--routing", "prefix-affinity", "--prefix-affinity-blocks", "2"]
    argv += ["--connect-timeout-s", "1.5", "--api-key", "sk-serve", "--shutdown-grace-s", "4"]
    commands = child_commands(parse_config(CONFIG, argv))

    gateway = _as_the_child_parses_it(commands["gateway"], {})
    assert (gateway.max_concurrent_requests, gateway.routing, gateway.prefix_affinity_blocks) == (3, "prefix-affinity", 2)
    assert (gateway.connect_timeout_s, gateway.api_key, gateway.shutdown_grace_s) == (1.5, "sk-serve", 4.0)
    assert (gateway.tokenizer, gateway.engine) == (["127.0.0.1:50052"], ["127.0.0.1:50053"])
    # Any local user can read a command line; the key travels in the environment.
    assert not any("sk-serve" in part for command in commands.values() for part in command.argv)
    for name in ("tokenizer", "engine"):
        child = _as_the_child_parses_it(commands[name], {})
        assert child.shutdown_grace_s == 4.0 and "PAGEWIRE_API_KEY" not in commands[name].env


@pytest.mark.usefixtures("no_pagewire_environment")
def test_an_option_given_to_serve_beats_the_variable_its_children_inherit(monkeypatch: pytest.MonkeyPatch) -> None:
    inherited = {"PAGEWIRE_MAX_NUM_SEQS": "8", "PAGEWIRE_MAX_CONCURRENT_REQUESTS": "5"}
    for name, value in inherited.items():
        monkeypatch.setenv(name, value)
    commands = child_commands(parse_config(CONFIG, ["--max-num-seqs", "256", "--max-concurrent-requests", "4096"]))
    assert _as_the_child_parses_it(commands["engine"], inherited).max_num_seqs == 256
    assert _as_the_child_parses_it(commands["gateway"], inherited).max_concurrent_requests == 4096
    # Without a flag, serve and its children read the same variable.
    commands = child_commands(parse_config(CONFIG, []))
    assert "--max-num-seqs" not in commands["engine"].argv
    assert _as_the_child_parses_it(commands["engine"], inherited).max_num_seqs == 8


def test_a_child_that_dies_is_named_with_its_exit_code_and_output_and_the_others_stop(tmp_path) -> None:  # type: ignore[no-untyped-def]
    serve = ServeProcess(["--model", str(tmp_path / "missing.gguf"), "--device", "cpu"], log_path=tmp_path / "serve.log")
    serve.start()
    assert serve.wait_exit(120) == 1, serve.log_tail()
    (death, *_) = serve.events("child exited")
    assert death["child"] in ("tokenizer", "engine")
    assert death["exit_code"] not in (0, None)
    assert "missing.gguf" in death["last_output"]
    for started in serve.events("started"):
        with pytest.raises(ProcessLookupError):
            os.kill(started["pid"], 0)


def start_serve_with_tls_env(log_path: Path, tls: TlsFiles) -> ServeProcess:
    serve = ServeProcess(
        ["--device", "cpu", "--num-kv-blocks", "64", "--max-model-len", "512"],
        log_path=log_path,
        # The TLS files as a container would set them, not as flags, are the point here.
        env={"PAGEWIRE_TLS_CERT": str(tls.cert_path), "PAGEWIRE_TLS_KEY": str(tls.key_path)},
    )
    serve.start()
    return serve


def test_serve_with_tls_from_the_environment_probes_the_gateway_over_tls(tmp_path, tls_files: TlsFiles) -> None:  # type: ignore[no-untyped-def]
    serve = start_serve_with_tls_env(tmp_path / "serve.log", tls_files)
    try:
        # Far below the launcher's 600 s startup timeout, which a probe that cannot speak TLS runs into.
        serve.wait_serving(TLS_READY_S)
        roots = tls_files.cert_path.read_bytes()
        serving_over_tls = check_health(f"localhost:{serve.ports['port']}", "pagewire.v1.Generation", root_certificates=roots)
        serving_in_plaintext = check_health(serve.grpc_target, "pagewire.v1.Generation", timeout_s=1.0)
    finally:
        exit_code = serve.stop()
    (serving,) = serve.events("pagewire is serving")
    assert serving["grpc_tls"] is True and serving["rest"].startswith("https://"), serving
    assert serving_over_tls and not serving_in_plaintext
    assert exit_code == 0, serve.log_tail()


def test_serve_with_a_certificate_its_probe_cannot_verify_says_so_and_stops(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Valid only for another name: the probe of 127.0.0.1 can never pass, so
    # serve must say why at once instead of waiting out its startup timeout.
    serve = start_serve_with_tls_env(tmp_path / "serve.log", self_signed_certificate(tmp_path, "pagewire.example"))
    assert serve.wait_exit(TLS_READY_S) == 1, serve.log_tail()
    (refusal,) = serve.events("gateway readiness cannot be probed")
    assert "cannot be verified for 127.0.0.1" in refusal["reason"], refusal
    assert not serve.events("pagewire is serving")
