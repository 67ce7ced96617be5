"""The optimizers sit side by side on shared layers: none imports another."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "soap_optim"
OPTIMIZERS = ("adam", "adafactor", "shampoo", "soap")


def _relative_imports(path: Path):
    """The first component of every ``from .x import ...`` in a module of the package."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            yield (node.module or "").split(".")[0]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_optimizer_imports_no_other_optimizer(name):
    imported = set(_relative_imports(PACKAGE / f"{name}.py"))
    assert imported, "the module is expected to import the shared layers"
    assert not imported & set(OPTIMIZERS), sorted(imported & set(OPTIMIZERS))


def test_moment_math_imports_no_optimizer():
    imported = set(_relative_imports(PACKAGE / "moment_math.py"))
    assert not imported & (set(OPTIMIZERS) | {"optimizer"})
