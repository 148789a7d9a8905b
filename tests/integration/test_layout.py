"""The package layout: the import contracts in pyproject.toml hold (``lint-imports``, as CI runs it) and
fedgluon/ stays a handful of sub-packages, not a flat list of modules."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # wherever tests/ nests
MAX_TOP_LEVEL_MODULES = 8  # issue 30: "fedgluon/ has at most 8 modules at its top level"
MAX_FORMATTED_LINES = 500  # issue 28: "after ruff format, no library file is over 500 lines"


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    """``lint-imports ARGS`` from the repository root, on this tree's packages, without the cache."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_import_contract_is_kept():
    run = lint_imports()
    said = run.stdout + run.stderr
    counts = re.search(r"Contracts: (\d+) kept, (\d+) broken", said)
    assert run.returncode == 0 and counts is not None, said
    assert int(counts[1]) >= 4 and int(counts[2]) == 0, said


def test_a_broken_contract_fails_lint_imports(tmp_path):
    """The harness above can fail: a contract the code breaks (the math imports the core) exits non-zero."""
    config = tmp_path / "broken.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["fedgluon"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "the math imports no core"\ntype = "forbidden"\n'
                      'source_modules = ["fedgluon.lmo"]\nforbidden_modules = ["fedgluon.core"]\n')
    run = lint_imports("--config", str(config))
    said = run.stdout + run.stderr
    assert run.returncode != 0 and "the math imports no core BROKEN" in said, said


def test_fedgluon_has_few_top_level_modules():
    modules = sorted(p.name for p in (ROOT / "fedgluon").glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, f"fedgluon/ has {len(modules)} top-level modules: {modules}"


def test_no_library_file_is_over_500_lines_after_ruff_format(tmp_path):
    """The library packages formatted as ruff would (line length 120) in a copy: each module at most
    MAX_FORMATTED_LINES lines, so a module that grows past one job is split rather than reflowed."""
    import shutil

    for package in ("fedgluon", "strategies", "compressors"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run([sys.executable, "-m", "ruff", "format", "-q", "--line-length", "120", "--no-cache", "."],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = {str(p.relative_to(tmp_path)): len(p.read_text().splitlines()) for p in tmp_path.rglob("*.py")}
    assert len(lines) > 50 and max(lines.values()) > 300  # the copy is the library, formatted
    assert {p: n for p, n in lines.items() if n > MAX_FORMATTED_LINES} == {}
