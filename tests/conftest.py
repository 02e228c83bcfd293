"""Session fixtures shared by all tests: generated gzip layers (tools/make_fixtures.py, small mode),
the committed fixtures directory, and `ci_required` for checks that may only be skipped off CI."""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn, cast

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"


def _load_tool(name: str) -> ModuleType:
    """Import tools/NAME.py by path: tools/ is not a package and src never imports it."""
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


make_fixtures = _load_tool("make_fixtures")
# Names of the generated inputs, for parametrize: good layers have NAME.tar next to NAME.tar.gz.
GOOD_LAYERS: tuple[str, ...] = make_fixtures.GOOD_LAYERS
BAD_INPUTS: tuple[str, ...] = make_fixtures.BAD_INPUTS
layer_tar = cast(Callable[[Path], Path], make_fixtures.layer_tar)


def ci_required(reason: str) -> NoReturn:
    """Skip with `reason` on a developer machine, but fail on CI (env CI set), where a missing
    tool or permission means the check silently stopped running."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


install_erofs_oracle = _load_tool("install_erofs_oracle")
ORACLE_HINT = "python3 tools/install_erofs_oracle.py (tools/test runs it)"


@functools.cache
def _oracle_problem(tool: str) -> str | None:
    """Why `tool` (an erofs-utils oracle wrapper) cannot be used, or None."""
    pins = install_erofs_oracle.parse_pins(install_erofs_oracle.PINS.read_text())
    wanted = pins.version(install_erofs_oracle.host_arch()).rsplit("-", 1)[0]
    if shutil.which(tool) is None:
        return f"{tool} (the erofs-utils {wanted} oracle) is not installed: {ORACLE_HINT}"
    if tool.startswith("mkfs.erofs"):
        result = subprocess.run([tool, "--version"], capture_output=True, text=True)
        first = (result.stdout or result.stderr).strip().splitlines()[:1]
        if result.returncode != 0 or not first or wanted not in first[0]:
            return (f"{tool} is {first[0] if first else 'broken'}, not the pinned erofs-utils "
                    f"{wanted}: {ORACLE_HINT}")
    return None


def require_oracle(*tools: str) -> None:
    """The named erofs-utils oracle tools (`mkfs.erofs-oracle`...), at the pinned version:
    fail on CI, skip elsewhere."""
    for tool in tools:
        problem = _oracle_problem(tool)
        if problem is not None:
            ci_required(problem)


@pytest.fixture(scope="session")
def layers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> path of every generated layer (`X.tar.gz`, tar beside it) and bad input (`bad-X.*`).

    Small mode: about 1 s to generate, about 25 MB on disk (the zeros tar is sparse).
    """
    outdir = tmp_path_factory.mktemp("layers")
    return cast(dict[str, Path], make_fixtures.make_layers(outdir, small=True))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The committed fixtures (fixtures/gzip/ has its README with commands and sha256s)."""
    return ROOT / "fixtures"
