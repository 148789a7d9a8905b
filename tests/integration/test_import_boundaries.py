"""Import boundaries checked in a fresh interpreter, where sys.modules shows what an import really pulls in
(``lint-imports`` checks the same contracts statically, from pyproject.toml)."""

import subprocess
import sys


def test_importing_compressors_imports_neither_flower_nor_ray():
    code = "import sys, compressors; bad = [m for m in ('flwr', 'ray') if m in sys.modules]; print(bad); " \
           "sys.exit(1 if bad else 0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
