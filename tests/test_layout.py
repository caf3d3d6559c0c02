"""The package layout: imports run one way (common <- kernels, data_shards <- evaluation <- trainer <- cluster
<- dcgan, the command that assembles them), test-only helpers stay out of product code, and `dcgan --help`
lists every command."""

import ast
import subprocess
import sys

import pytest
from conftest import ROOT, child_env

PROJECT = ("common", "kernels", "data_shards", "evaluation", "trainer", "cluster", "dcgan")
# what each package may import of the project: imports run one way, down this list
MAY_IMPORT = {"common": set(), "kernels": {"common"}, "data_shards": {"common"},
              "evaluation": {"common", "kernels", "data_shards"},
              "trainer": {"common", "kernels", "data_shards", "evaluation"},
              "cluster": {"common", "kernels", "data_shards", "evaluation", "trainer"}, "dcgan": set(PROJECT)}
TEST_ONLY = "cluster.testing"  # a loopback Ray head for tests and benchmarks: no product module imports it


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import anywhere in the tree: module level, in functions, under TYPE_CHECKING."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_imports_run_one_way():
    offending = []
    for package in PROJECT:
        for path in sorted((ROOT / package).rglob("*.py")):
            where = str(path.relative_to(ROOT))
            for line, module in _imported_modules(ast.parse(path.read_text(), where)):
                top = module.partition(".")[0]
                if top in PROJECT and top != package and top not in MAY_IMPORT[package]:
                    offending.append(f"{where}:{line}: {module}")
                elif module.startswith(TEST_ONLY) and not where.startswith("cluster/testing/"):
                    offending.append(f"{where}:{line}: {module} (test-only)")
    assert not offending, "imports against the layering:\n" + "\n".join(offending)


def test_help_lists_every_command_in_one_line():
    res = subprocess.run([sys.executable, "-m", "dcgan", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=child_env())
    listed = [line.split("  ")[1].strip() for line in res.stdout.splitlines() if line.startswith("  dcgan ")]
    assert listed == ["dcgan train", "dcgan sample", "dcgan eval features", "dcgan eval fid", "dcgan monitor",
                      "dcgan data convert", "dcgan data dedup", "dcgan data sample-lsun", "dcgan data verify",
                      "dcgan bench"], res.stdout


@pytest.mark.parametrize("args", [["--help"], ["sample", "--help"], ["eval", "fid", "--help"]])
def test_command_line_help(args):
    res = subprocess.run([sys.executable, "-m", "dcgan", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=child_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: dcgan" in res.stdout
