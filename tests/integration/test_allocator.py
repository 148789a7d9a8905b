"""fedgluon.runtime.allocator: glibc keeps freed memory mapped where fedgluon owns the process.

Each check runs in a fresh interpreter: the settings are process-wide and permanent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedgluon.runtime.allocator import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="needs glibc's malloc")

# Four passes of 100 MB, as a hundred 1 MB tensors or one 100 MB bytes object (as a packed record's
# join makes), each pass freed before the next: the minor faults of each pass.
PASSES = """
import json, resource, sys, torch
from fedgluon.runtime.allocator import applied, keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
make = {"tensors": lambda: [torch.ones(1 << 18) for _ in range(100)], "bytes": lambda: b"1" * (100 << 20)}[sys.argv[2]]
counts = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    live = make()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del live
print(json.dumps({"kept": kept, "applied": applied(), "faults": counts}))
"""


def _run(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["tensors", "bytes"])
def test_freed_memory_is_reused_instead_of_faulted_in_again(kind):
    """With glibc's defaults the second pass faults its 100 MB in afresh: 1 MB chunks were mmapped in the
    first pass and unmapped when freed; a 100 MB chunk, above any mmap threshold glibc takes, is mmapped
    and unmapped every time (the premise). Kept, every later pass reuses the first pass's pages."""
    default, kept = _run(PASSES, "default", kind), _run(PASSES, "keep", kind)
    assert not default["applied"] and kept["kept"] and kept["applied"]
    first = kept["faults"][0]
    assert first > 20_000  # 100 MB of 4 KiB pages, touched once
    assert default["faults"][1] > 0.5 * default["faults"][0], default
    assert all(f < 0.2 * first for f in kept["faults"][1:]), kept


def test_the_environment_turns_it_off_and_it_applies_once():
    off = _run(PASSES, "keep", "tensors", env={"FEDGLUON_KEEP_FREED_MEMORY": "0"})
    assert not off["kept"] and not off["applied"]
    twice = _run("import json; from fedgluon.runtime.allocator import keep_freed_memory as k, applied; "
                 "print(json.dumps({'calls': [k(), k()], 'applied': applied()}))")
    assert twice == {"calls": [True, True], "applied": True}


def test_the_command_line_applies_it_and_a_user_process_is_left_alone():
    code = ("import json; from click.testing import CliRunner; from fedgluon.runtime.allocator import applied; "
            "from fedgluon.exp.cli import main; import fedgluon.sim.driver; before = applied(); "
            "result = CliRunner().invoke(main, ['list']); "
            "print(json.dumps({'before': before, 'after': applied(), 'code': result.exit_code}))")
    assert _run(code) == {"before": False, "after": True, "code": 0}
