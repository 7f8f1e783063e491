"""The dependency rule: trainer -> model <- app. The app never imports the trainer; model neither."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"app": {"trainer"}, "model": {"app", "trainer"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_dependency_rule(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    violations = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package]) for path in files}
    assert {path: bad for path, bad in violations.items() if bad} == {}


def test_model_does_not_need_serving_or_training_libraries() -> None:
    """model/ is pure torch: it ships in the serving image without the web or training stack."""
    heavy = {"fastapi", "starlette", "uvicorn", "matplotlib", "tqdm"}
    for path in sorted((ROOT / "model").rglob("*.py")):
        assert not imported_packages(path) & heavy, path


def test_a_front_end_process_imports_no_torch() -> None:
    """A front-end of `--frontends N` parses, decodes and answers without the model's runtime:
    torch would cost each one about 280 MB and over a second of its start. The device process's
    modules (engine, lifespan, worker) stay out of its imports, and preprocessing is numpy."""
    check = "import sys, app.frontend; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
