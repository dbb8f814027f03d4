"""The runtime package does not reach into spac_gguf.testing (model builders, evaluation,
synthetic traces): what `spac-gguf` and `spac_gguf.load` run never imports it, not even lazily
inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "spac_gguf"
ALIAS = "testmodels.py"     # the moved module's old name, kept while tests/test_gpu.py imports it


def _imports_testing(tree: ast.AST) -> list[int]:
    """Line numbers of every import of spac_gguf.testing in a module of spac_gguf/ (any depth)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            relative = node.level == 1 and (mod == "testing" or mod.startswith("testing.")
                                            or (not mod and any(a.name == "testing" for a in node.names)))
            absolute = node.level == 0 and (mod == "spac_gguf.testing" or mod.startswith("spac_gguf.testing.")
                                            or (mod == "spac_gguf" and any(a.name == "testing" for a in node.names)))
            if relative or absolute:
                lines.append(node.lineno)
        elif isinstance(node, ast.Import):
            if any(a.name == "spac_gguf.testing" or a.name.startswith("spac_gguf.testing.") for a in node.names):
                lines.append(node.lineno)
    return lines


def test_runtime_modules_do_not_import_testing():
    runtime = [p for p in PKG.glob("*.py") if p.name != ALIAS]
    assert len(runtime) > 20
    found = {p.name: ln for p in runtime if (ln := _imports_testing(ast.parse(p.read_text())))}
    assert found == {}


def test_the_check_sees_imports():
    """The check is not vacuous: the old name's alias does import the subpackage, in the forms used."""
    if (PKG / ALIAS).exists():
        assert _imports_testing(ast.parse((PKG / ALIAS).read_text()))
    for src in ("from .testing import models", "from .testing.models import make_pair", "from . import testing",
                "def f():\n    from spac_gguf.testing import synthetic", "import spac_gguf.testing.models"):
        assert _imports_testing(ast.parse(src)), src
    assert not _imports_testing(ast.parse("from . import trace\nfrom .trace import RoutingTrace"))
