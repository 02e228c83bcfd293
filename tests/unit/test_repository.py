"""The repository alone is enough: the README's one test command is what CI runs, nothing
points outside the clone, and the default install has everything the main job (mounting) needs."""

from __future__ import annotations

import re
import subprocess
import tomllib

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _section(title: str) -> str:
    match = re.search(rf"(?ms)^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README)
    assert match is not None, f"README.md has no '## {title}' section"
    return match.group(1)


def _commands(text: str) -> list[str]:
    """The command lines of the ```sh blocks in `text` (comments and blank lines left out)."""
    lines: list[str] = []
    for block in re.findall(r"(?ms)^```sh\n(.*?)^```", text):
        lines += [line.split("  #")[0].strip() for line in block.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    return lines


def test_readme_names_one_test_command_and_ci_runs_exactly_it() -> None:
    commands = _commands(_section("Run the tests"))
    assert commands == ["tools/test"]
    script = (ROOT / ".ci" / "run").read_text()
    run = [line.strip() for line in script.splitlines()
           if line.strip() and not line.lstrip().startswith("#")]
    assert run[-1] == f"exec {commands[0]}"
    assert all(line.startswith(("set ", "cd ", "export CI=")) for line in run[:-1])
    assert (ROOT / commands[0]).stat().st_mode & 0o111


def test_nothing_refers_to_files_outside_the_repository() -> None:
    files = subprocess.run(["git", "ls-files", ".ci", "tests", "tools", "src", "fixtures",
                            "docs", "pyproject.toml", "README.md", "CHANGELOG.md"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert files, "git ls-files found nothing"
    outside = re.compile(r"\.\./shared|/work/shared|/work/main")
    offenders = [name for name in files if name != "tests/unit/test_repository.py"
                 and outside.search((ROOT / name).read_text(errors="replace"))]
    assert offenders == []


def test_the_default_install_can_mount() -> None:
    """mfusepy (pure Python over ctypes) is a dependency, not an extra: only the system's
    libfuse3 can be missing, and that is one line naming the Debian package (test_fuse_cli)."""
    names = [re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower()
             for dep in PYPROJECT["project"]["dependencies"]]
    assert "mfusepy" in names
    assert not PYPROJECT["project"]["optional-dependencies"].get("fuse")


def test_click_is_bounded_below_the_release_that_drops_apis_we_use() -> None:
    (click,) = [dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("click")]
    assert "<9" in click.replace(" ", "")


def test_no_click_api_deprecated_in_8_x_is_used() -> None:
    """Click 8.5 deprecates the stream helpers (gone in 9); stdio is used directly instead."""
    deprecated = re.compile(r"get_(?:binary|text)_stream|click\.__version__|BaseCommand|"
                            r"MultiCommand|protected_args")
    offenders = [str(path.relative_to(ROOT)) for path in (ROOT / "src").rglob("*.py")
                 if deprecated.search(path.read_text())]
    assert offenders == []


def test_readme_says_what_a_bare_debian_12_needs() -> None:
    install = _section("Install")
    assert "pip install ." in _commands(install)
    for needed in ("python3-venv", "fuse3", "PEP 668"):
        assert needed in install
