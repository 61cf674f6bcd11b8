"""Every CUDA source compiles with nvcc, for every instantiation the loader can
request, from the text and with the flags NVRTC gets on the GPU. Catches
syntax and template errors on machines without a GPU; skipped where nvcc is
not installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pagewire.kernels import cuda_fp8_quant, cuda_gemv, cuda_layer_ops, cuda_lora, cuda_ops, cuda_token_bitmask
from pagewire.kernels.loader import COMPILE_OPTIONS, KERNEL_DIR, source_code

NVCC = shutil.which("nvcc")


def all_kernel_names() -> dict[str, list[str]]:
    """Every instantiation the launchers can request, per source file."""
    return {
        **cuda_ops.all_kernel_names(),
        cuda_layer_ops.SOURCE: cuda_layer_ops.kernel_names(),
        cuda_gemv.SOURCE: cuda_gemv.kernel_names(),
        cuda_fp8_quant.SOURCE: cuda_fp8_quant.kernel_names(),
        cuda_lora.SOURCE: cuda_lora.kernel_names(),
        cuda_token_bitmask.SOURCE: cuda_token_bitmask.kernel_names(),
    }


def test_every_source_has_its_kernels_listed() -> None:
    assert {path.name for path in KERNEL_DIR.glob("*.cu")} == set(all_kernel_names())


def test_the_loader_pastes_in_every_header() -> None:
    """NVRTC gets one text: no source is left including anything."""
    for source in all_kernel_names():
        assert "#include" not in "\n".join(line for line in source_code(source).splitlines() if not line.lstrip().startswith("//"))
    assert source_code("lora.cu").count("struct Bf16") == 1


# Kernels that read weights (written at load, never by a kernel) before they
# wait, and which memory they may touch before: the pointer arguments it
# derives from and nothing else.
READ_BEFORE_WAITING = {"gemv_kernel": {"weight"}}
POINTER_ARGUMENT = re.compile(r"\*\s*__restrict__\s+(\w+)")


def test_every_kernel_first_waits_for_the_kernel_before_it() -> None:
    """The loader launches every kernel as a programmatic dependent (sm_90+),
    so each must wait for its predecessor before touching memory it may have
    written: its body opens with enter_dependent_grid(), or (the kernels of
    READ_BEFORE_WAITING) names no other pointer argument before it."""
    for path in KERNEL_DIR.glob("*.cu"):
        text = path.read_text()
        kernels = list(re.finditer(r"__global__[^{]*?(\w+)\(((?:[^()]|\([^()]*\))*)\)\s*\{([^\n]*\n)(\s*\S[^\n]*)", text))
        assert kernels, path.name
        for kernel in kernels:
            name, arguments, first_statement = kernel.group(1), kernel.group(2), kernel.group(4).strip()
            if name not in READ_BEFORE_WAITING:
                assert first_statement == "enter_dependent_grid();", f"{path.name}: {name} starts with {first_statement!r}"
                continue
            before_waiting = text[kernel.end(3) : text.index("enter_dependent_grid();", kernel.end(3))]
            for pointer in set(POINTER_ARGUMENT.findall(arguments)) - READ_BEFORE_WAITING[name]:
                assert not re.search(rf"(?<![.\w]){pointer}\b", before_waiting), f"{path.name}: {name} touches {pointer} before it waits"


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(all_kernel_names()))
def test_source_compiles_with_nvcc(source: str, tmp_path: Path) -> None:
    names = all_kernel_names()[source]
    # Taking each kernel's address instantiates exactly the templates the loader uses.
    unit = tmp_path / "unit.cu"
    unit.write_text(
        f"{source_code(source)}\n"
        f"void* const kernel_instantiations[] = {{{', '.join(f'(void*)&{name}' for name in names)}}};\n"
    )
    result = subprocess.run(
        [NVCC, *COMPILE_OPTIONS, "-arch=sm_90", "-c", str(unit), "-o", str(tmp_path / "unit.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
