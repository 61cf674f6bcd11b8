"""The distribution adds one import name, `pagewire`, and the engine's layers
keep their imports apart: the core knows neither gRPC nor torch, and the core
process's child runs without loading gRPC."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(out_dir: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out_dir), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = out_dir.glob("pagewire-*.whl")
    return wheel


def _source_packages() -> set[str]:
    """Every package folder of services/ and kernels/, by its installed name."""
    names = {"pagewire.v1"}
    for folder in ("services", "kernels"):
        for init in (ROOT / folder).rglob("__init__.py"):
            names.add("pagewire." + ".".join(init.parent.relative_to(ROOT).parts))
    return names


def test_wheel_installs_only_the_pagewire_name(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"pagewire"}
    packaged = {".".join(Path(n).parent.parts) for n in names if n.endswith("/__init__.py")}
    assert packaged == _source_packages(), "pyproject.toml's package list differs from the package folders"
    assert "pagewire/v1/engine_pb2.py" in names and "pagewire/v1/engine_pb2.pyi" in names
    assert {"pagewire/kernels/paged_attention.cu", "pagewire/kernels/layer_ops.cu", "pagewire/kernels/dtypes.cuh"} <= set(names)
    assert "pagewire = pagewire.services.cli:main" in entry_points


def _modules_loaded_by(statement: str) -> set[str]:
    probe = f"import sys\n{statement}\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    return set(done.stdout.split())


def _loads(modules: set[str], package: str) -> bool:
    return any(name == package or name.startswith(package + ".") for name in modules)


def test_core_process_child_loads_no_grpc() -> None:
    modules = _modules_loaded_by(
        "from pagewire.services.engine.service.core_process import _child_main\n"
        "from pagewire.services.engine.executor.model_executor import create_engine_core"
    )
    assert "pagewire.services.engine.service.core_process" in modules
    assert not _loads(modules, "grpc")
    assert not _loads(modules, "pagewire.v1")


def test_engine_core_imports_neither_grpc_nor_torch() -> None:
    modules = _modules_loaded_by("import pagewire.services.engine.core.step_loop")
    assert not _loads(modules, "grpc")
    assert not _loads(modules, "torch")
    assert not _loads(modules, "pagewire.services.engine.executor")
