"""The layers of docs/architecture.md hold: each module imports only the layers beneath it (import-linter's
contract in pyproject.toml), and a module that breaks them is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_module_imports_only_the_layers_beneath_it():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_import_upward_breaks_the_contract(tmp_path):
    """The pipeline reaching up into capture (as it once did for the call record) is reported, with the line."""
    shutil.copytree(ROOT / "joule_otel", tmp_path / "joule_otel", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    pipeline = tmp_path / "joule_otel" / "_pipeline.py"
    pipeline.write_text(pipeline.read_text() + "\nfrom joule_otel._capture import Capture  # noqa: E402\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "joule_otel._pipeline is not allowed to import joule_otel._capture" in result.stdout
