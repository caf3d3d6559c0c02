"""The package layout: evaluation/'s library never imports trainer/, and the command line still builds."""

import ast
import subprocess
import sys

import pytest
from conftest import ROOT, child_env

# the one module of evaluation/ that may import trainer/: it reads checkpoints for the commands
TRAINER_ALLOWED = {"commands.py"}


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import anywhere in the tree: module level, in functions, under TYPE_CHECKING."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_evaluation_library_does_not_import_trainer():
    modules = sorted((ROOT / "evaluation").rglob("*.py"))
    assert {p.name for p in modules} >= {"__init__.py", "images.py", "fid.py", "features.py", "latent.py",
                                         "datasets.py", "commands.py"}
    offending = []
    for path in modules:
        if path.name in TRAINER_ALLOWED:
            continue
        for line, module in _imported_modules(ast.parse(path.read_text(), str(path))):
            if module == "trainer" or module.startswith("trainer."):
                offending.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offending, "evaluation/ imports trainer/:\n" + "\n".join(offending)


@pytest.mark.parametrize("args", [["--help"], ["sample", "--help"], ["eval", "fid", "--help"]])
def test_command_line_help(args):
    res = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: dcgan" in res.stdout
