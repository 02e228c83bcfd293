"""Session fixtures shared by all tests: generated gzip layers (tools/make_fixtures.py, small mode),
the committed fixtures directory, and `ci_required` for checks that may only be skipped off CI."""

from __future__ import annotations

import importlib.util
import os
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
