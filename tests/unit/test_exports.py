"""The package's public API: everything in __all__ exists and the CLI entry points load."""

from __future__ import annotations

import subprocess
import sys

import hybrid_erofs


def test_all_names_exist() -> None:
    for name in hybrid_erofs.__all__:
        assert hasattr(hybrid_erofs, name), name
    assert sorted(hybrid_erofs.__all__) == hybrid_erofs.__all__


def test_python_dash_m_and_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "hybrid_erofs", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "index" in out and "inspect" in out
