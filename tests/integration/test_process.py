"""fedgluon.runtime.prepare_process: the one entry point that prepares a process fedgluon owns (the command
line, a Ray worker running a spec's ClientApp, a sweep member's task), and a user's process left alone.

Each check that prepares a process runs in a fresh interpreter: the settings are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SPEC = {"task": {"name": "synthetic", "num_clients": 2, "dim": 4, "classes": 2, "mean_samples": 10, "hidden": []},
        "algorithm": {"name": "gluon", "lr": 0.1}, "rounds": 1, "seed": 0, "threads": 3}

STATE = ("import gc, json, torch; from fedgluon.runtime.allocator import applied; "
         "from fedgluon.runtime import process; "
         "state = lambda: {'malloc': applied(), 'owned': process._owned['is'], 'threads': torch.get_num_threads(), "
         "'frozen': gc.get_freeze_count() > frozen0}; frozen0 = gc.get_freeze_count(); ")


def _run(code: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FEDGLUON_KEEP_FREED_MEMORY", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_user_process_that_runs_fedgluon_is_left_alone():
    """Importing fedgluon, building a ClientApp and running the in-process engine change no process
    setting: no malloc settings, no freeze, the caller's thread count."""
    code = STATE + ("from fedgluon.flower.client_app import make_client_app; from fedgluon.flower.engines import "
                    f"run_inprocess; spec = {SPEC!r}; app = make_client_app(spec); run_inprocess(spec); "
                    "print(json.dumps(state()))")
    assert _run(code) == {"malloc": False, "owned": False, "threads": 1, "frozen": False}


def test_a_ray_worker_that_unpickles_the_client_app_is_prepared():
    """A Ray worker gets the ClientApp pickled (fedgluon.flower.client_app.SpecClientApp): unpickling it
    prepares the process (malloc settings, the spec's threads); nothing freezes the collector's objects."""
    code = STATE + (f"import pickle; from fedgluon.flower.client_app import make_client_app; spec = {SPEC!r}; "
                    "data = pickle.dumps(make_client_app(spec)); before = state(); pickle.loads(data); "
                    "print(json.dumps({'before': before, 'after': state()}))")
    got = _run(code)
    assert got["before"] == {"malloc": False, "owned": False, "threads": 1, "frozen": False}
    assert got["after"] == {"malloc": True, "owned": True, "threads": 3, "frozen": False}


def test_prepare_process_sets_malloc_and_threads_and_may_be_called_again():
    code = STATE + ("from fedgluon.runtime import prepare_process; "
                    "print(json.dumps({'got': [prepare_process(threads=2), prepare_process()], 'state': state()}))")
    got = _run(code)
    assert got["got"] == [{"malloc": True, "threads": 2}, {"malloc": True, "threads": 2}]
    assert got["state"] == {"malloc": True, "owned": True, "threads": 2, "frozen": False}


def test_prepare_process_refuses_a_bad_thread_count():
    from fedgluon.runtime import prepare_process

    with pytest.raises(ValueError, match="threads"):
        prepare_process(threads=0)
