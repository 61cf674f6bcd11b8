"""`pagewire serve`: the children's command lines, a child that dies, and a
gateway that serves TLS."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pagewire.services.common.config import parse_config
from pagewire.services.common.grpc_utils import check_health
from pagewire.services.common.tls import TlsFiles
from pagewire.services.launcher import CONFIG, child_commands
from tests.support.certificates import self_signed_certificate
from tests.support.harness import ServeProcess

# Seconds `pagewire serve` on the embedded model gets to say it is serving.
TLS_READY_S = 120.0


def flags_of(command: list[str]) -> list[str]:
    assert command[:3] == [sys.executable, "-m", "pagewire.services.cli"]
    return command[3:]


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
    assert "--model" not in gateway


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
