"""The checked-in stubs must be exactly what scripts/gen_protos.py makes of protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = ROOT / "protos"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(root: Path) -> dict[str, str]:
    """The generated files under root: stubs and package markers, not the .proto sources."""
    generated = [p for p in root.rglob("*.py*") if "__pycache__" not in p.parts]
    return {str(p.relative_to(root)): p.read_text() for p in generated}


def test_stubs_match_protos(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh, checked_in = _files(tmp_path), _files(CHECKED_IN)
    assert sorted(fresh) == sorted(checked_in), "stub files differ: run python scripts/gen_protos.py"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs {stale}: run python scripts/gen_protos.py"


def test_stubs_import_and_describe_every_service() -> None:
    from pagewire.v1 import engine_pb2, gateway_pb2, tokenizer_pb2

    assert set(engine_pb2.DESCRIPTOR.services_by_name) == {"Engine"}
    assert set(tokenizer_pb2.DESCRIPTOR.services_by_name) == {"Tokenizer"}
    assert set(gateway_pb2.DESCRIPTOR.services_by_name) == {"Generation"}


def test_sampling_knobs_distinguish_unset_from_zero() -> None:
    from pagewire.v1 import common_pb2

    params = common_pb2.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature")
    assert common_pb2.FinishReason.Value("FINISH_REASON_UNSPECIFIED") == 0


def _buf_command(tmp_path: Path) -> list[str] | None:
    """buf from the npm registry (@bufbuild/buf), or None where it can't be had."""
    import shutil
    import subprocess

    if shutil.which("buf"):
        return ["buf"]
    if not shutil.which("npm"):
        return None
    prefix = tmp_path / "buf-npm"
    done = subprocess.run(["npm", "install", "--silent", "--prefix", str(prefix), "@bufbuild/buf"], capture_output=True, timeout=180)
    binary = prefix / "node_modules" / ".bin" / "buf"
    return [str(binary)] if done.returncode == 0 and binary.exists() else None


def test_protos_pass_buf_lint(tmp_path: Path) -> None:
    import shutil
    import subprocess

    import google.rpc.status_pb2
    import pytest
    import yaml

    buf = _buf_command(tmp_path)
    if buf is None:
        pytest.skip("buf is not installed and @bufbuild/buf could not be installed from npm")
    workspace = tmp_path / "workspace"
    shutil.copytree(ROOT / "protos", workspace / "protos")
    status_proto = Path(google.rpc.status_pb2.__file__).with_name("status.proto")
    (workspace / "deps" / "google" / "rpc").mkdir(parents=True)
    shutil.copy(status_proto, workspace / "deps" / "google" / "rpc" / "status.proto")
    config = yaml.safe_load((ROOT / "buf.yaml").read_text())
    config["modules"].append({"path": "deps"})
    (workspace / "buf.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([*buf, "lint", "protos"], cwd=workspace, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
