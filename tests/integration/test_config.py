"""Config validation through the real CLI: every field of the structured config, out of range, of the
wrong type and missing, gives one ``error:`` line naming the field and its allowed values, a non-zero
exit, no traceback and no run directory.

"Missing" means null (``key=null``, or ``key:`` with no value in a YAML file): OmegaConf's ``???``
merges as "not given" and keeps the default, and a structured config has no way to delete a field.
Fields typed ``X | None`` take null as "the default" (``output.name``, ``engine.address``), so null
is not missing for them.
"""

from __future__ import annotations

import subprocess
import sys
import types
import typing

import pytest
from click.testing import CliRunner
from omegaconf import OmegaConf

from fedgluon.config import schema as config
from fedgluon.exp.cli import main
from fedgluon.sim.faults import FaultPlan

BASE = ["engine.name=plain", "--quiet"]

OUT_OF_RANGE = {  # one override per field, out of the field's allowed values
    "task": "task.name=nope", "geometry": "geometry.preset=nope", "algorithm": "algorithm.name=nope",
    "rounds": "rounds=-1", "seed": "seed=-1", "participation": "participation=1.5", "weights": "weights=median",
    "eval_every": "eval_every=0", "grad_norm_every": "grad_norm_every=-1", "threads": "threads=-3",
    "round_timeout": "round_timeout=0", "node_timeout": "node_timeout=-1", "engine.name": "engine.name=spark",
    "engine.num_cpus": "engine.num_cpus=0", "engine.num_gpus": "engine.num_gpus=-1",
    "engine.block_size": "engine.block_size=0", "engine.client_device": "engine.client_device=tpu",
    "engine.workers": "engine.workers=0", "network.uplink_mbps": "network.uplink_mbps=0",
    "network.downlink_mbps": "network.downlink_mbps=-1", "network.latency_ms": "network.latency_ms=-5",
    "network.bits": "network.bits=int7", "output.name": "output.name=..", "output.overwrite": "output.overwrite=true",
    "output.checkpoint_every": "output.checkpoint_every=-1", "faults.raise_prob": "faults.raise_prob=1.5",
    "faults.delay_prob": "faults.delay_prob=-0.1", "faults.delay_s": "faults.delay_s=-1",
    "faults.die": "faults.die=[[0,99]]", "faults.phase": "faults.phase=-1", "max_failed_rounds": "max_failed_rounds=-1",
}
NO_OUT_OF_RANGE = {  # fields whose every value of the right type is legal
    "engine.address": "any string: Ray checks the address when it connects",
    "engine.fast_dispatch": "both booleans are legal",
    "output.dir": "any path; one where the run directory cannot be made is refused then (tested below)",
    "output.save_model": "both booleans are legal",
}
WRONG_TYPE = {int: "abc", float: "abc", bool: "maybe", str: "[1,2]", dict: "5", list: "5"}


def _base_type(t: typing.Any) -> tuple[type, bool]:
    """The field's type without ``None``, and whether it is optional."""
    args = typing.get_args(t)
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        return next(a for a in args if a is not type(None)), type(None) in args
    return typing.get_origin(t) or t, False


def _cases():
    for key, t in config.fields().items():
        base, optional = _base_type(t)
        if key in OUT_OF_RANGE:
            yield pytest.param(key, OUT_OF_RANGE[key], id=f"{key}-range")
        yield pytest.param(key, f"{key}={WRONG_TYPE[base]}", id=f"{key}-type")
        if not optional:
            yield pytest.param(key, f"{key}=null", id=f"{key}-missing")


def _section_cases():
    """The scalar options of the default task, geometry and algorithm sections (their builders check
    them): of the wrong type and null."""
    defaults = OmegaConf.structured(config.ExperimentConfig)
    for section in config.SECTIONS:
        for option, value in defaults[section].items():
            if option == "name" or not isinstance(value, (int, float, str)):
                continue
            key = f"{section}.{option}"
            wrong = "[1,2]" if isinstance(value, str) else "abc"
            yield pytest.param(key, f"{key}={wrong}", id=f"{key}-type")
            yield pytest.param(key, f"{key}=null", id=f"{key}-missing")


def test_every_config_field_has_an_out_of_range_case_or_a_reason():
    """A new config field fails here until it gets an out-of-range case (or a reason it has none)."""
    assert set(config.fields()) == set(OUT_OF_RANGE) | set(NO_OUT_OF_RANGE)
    assert not set(OUT_OF_RANGE) & set(NO_OUT_OF_RANGE)
    assert set(config.fields()) == set(config.RULES)  # every field's allowed values are written down


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize("key, override", [*_cases(), *_section_cases()])
def test_a_bad_config_field_is_one_error_line_naming_it(tmp_path, monkeypatch, key, override):
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["run", *BASE, override], catch_exceptions=False)
    assert out.exit_code != 0
    line = one_error_line(out.output)
    assert key in line and ("must be" in line or "must not" in line), line
    assert list(tmp_path.iterdir()) == []  # no run directory, no runs/


@pytest.mark.parametrize("key", ["rounds", "engine.num_gpus", "task"])
def test_wrong_type_and_missing_values_name_the_allowed_values(tmp_path, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    base, _ = _base_type(config.fields()[key])
    for override in (f"{key}={WRONG_TYPE[base]}", f"{key}=null"):
        line = one_error_line(CliRunner().invoke(main, ["run", *BASE, override], catch_exceptions=False).output)
        assert f"{key} must be {config.allowed(key)}" in line, line


@pytest.mark.parametrize("override, words", [
    ("participation=1.5", ["participation must be", "(0, 1]", "whole number"]),
    ("participation=100", ["participation must be", "[1, 10]", "got 100"]),
    ("threads=-3", ["threads must be an integer >= 1"]),
    ("threads=0", ["threads must be an integer >= 1"]),
    ("engine.num_gpus=-1", ["engine.num_gpus must be a number >= 0"]),
    ("network.latency_ms=-5", ["network.latency_ms must be a number >= 0"]),
    ("node_timeout=-1", ["node_timeout must be a number of seconds > 0"]),
    ("faults.die=[[0,10]]", ["faults.die must be", "0 <= client < 10", "[[0, 10]]"]),
    ("faults.die=[[-1,0]]", ["faults.die must be", "[[-1, 0]]"]),
    ("algorithm.compressor.min_k=5000", ["algorithm.compressor.min_k must be an integer in [1, 3840]", "got 5000"]),
    ("task.hidden=[-5]", ["task.hidden must be", "integers >= 1", "[-5]"]),
    ("seed=-1", ["seed must be an integer >= 0", "got -1"]),
    ("rounds=0", ["rounds must be an integer >= 1", "got 0"]),  # ran, reported complete, wrote no metrics
    ("faults.delay_s=inf", ["faults.delay_s must be a number of seconds >= 0", "got inf"]),
    ("round_timeout=nan", ["round_timeout must be a number of seconds > 0", "got nan"]),
    ("output.name=.", ["output.name must be", "plain name"]),
    ("output.name=a/b", ["output.name must be", "no path separator"]),
    ("output.name=/tmp/elsewhere", ["output.name must be", "not absolute"]),
    ("output.overwrite=false", ["output.overwrite must not be set", "--overwrite"]),
    # a builder's own check names the field with its section
    ("algorithm.compressor.ratio=-0.1", ["algorithm.compressor.ratio must be in (0, 1]", "got -0.1"]),
    ("algorithm.lr=-0.1", ["algorithm.lr must be"]),
    ("algorithm.downlink={name: topk, ratio: 2}", ["algorithm.downlink.ratio must be in (0, 1]"]),
    ("algorithm.values=int9", ["algorithm.values must be one of", "'int8'"]),
    ("task={name: digits, partition: diriclet}", ["task.partition must be one of", "'dirichlet'"]),
    ("task.alpha=-1", ["task.alpha must be >= 0", "got -1"]),
    ("task={name: digits, partition: dirichlet, alpha: -1}", ["task.alpha must be > 0"]),
    ("task={name: libsvm}", ["task.path must name"]),
    ("geometry.ns_steps=0", ["geometry.ns_steps must be >= 1"]),
    ("geometry.ns_steps=x", ["geometry.ns_steps must be an integer"]),
    # lists, mappings and YAML slips in overrides
    ("algorithm.lr=[0.1,0.2]", ["algorithm.lr must be a number", "sweep's grid"]),
    ("algorithm.lr={a: 1}", ["algorithm.lr must be a number"]),
    ("algorithm.compressor.ratio=[0.1,0.2]", ["algorithm.compressor.ratio must be a number"]),
    ("algorithm.compressor={name: topk", ["override 'algorithm.compressor={name: topk'", "not YAML"]),
    ("algorithm.compressor.name=int8", ["algorithm.compressor.name must be one of", "values int8"]),
    ("~algorithm.refresh_prob", ["overrides must look like key=value", "not removed or added", "only the options"]),
    ("+algorithm.extra=1", ["overrides must look like key=value", "Hydra's ~ and +"]),
])
def test_values_accepted_or_crashing_before_are_refused(tmp_path, monkeypatch, override, words):
    """Each of these ran (or died with a traceback, or with a message that did not name the field)."""
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["run", *BASE, "rounds=2", override], catch_exceptions=False)
    assert out.exit_code != 0
    line = one_error_line(out.output)
    for w in words:
        assert w in line, line
    assert list(tmp_path.iterdir()) == []


def test_faults_phase_is_read_from_yaml_and_overrides_and_reaches_the_run_spec(tmp_path):
    """``faults.phase`` (fedgluon/sim/faults.py: the client phase whose tasks the faults strike) is a config
    field: a YAML file or an override sets it and the run spec carries it; a negative, non-integer or
    missing phase, or one the algorithm does not have, is one ConfigError line naming the field."""
    (tmp_path / "dion.yaml").write_text("algorithm:\n  name: dion\nfaults:\n  raise_prob: 0.2\n  phase: 1\n")
    for path, overrides in ((tmp_path / "dion.yaml", []), (None, ["algorithm.name=dion", "faults.phase=1"])):
        faults = config.spec_of(config.load(path, ["engine.name=plain", *overrides]))["faults"]
        assert FaultPlan.from_spec(faults).phase == 1
    assert config.spec_of(config.load(None, ["engine.name=plain"]))["faults"]["phase"] == 0
    for overrides, words in ((["faults.phase=-1"], "an integer >= 0"), (["faults.phase=x"], "an integer >= 0"),
                             (["faults.phase=null"], "an integer >= 0"), (["faults.phase=2"], "< 2"),
                             (["algorithm.name=gluon", "faults.phase=1"], "< 1 (the client phases per round of")):
        with pytest.raises(config.ConfigError) as err:
            config.load(tmp_path / "dion.yaml", overrides)
        line = str(err.value)
        assert "\n" not in line and line.startswith("faults.phase must be") and words in line, line


def test_a_config_file_may_not_request_overwriting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shared.yaml").write_text("rounds: 2\noutput:\n  overwrite: true\n")
    out = CliRunner().invoke(main, ["run", "shared.yaml", *BASE], catch_exceptions=False)
    assert out.exit_code != 0
    assert "output.overwrite must not be set in config file shared.yaml" in one_error_line(out.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.yaml"]
    assert not config.load(None, ["engine.name=plain"]).output.overwrite
    assert config.load(None, ["engine.name=plain"], overwrite=True).output.overwrite  # the Python API may


def test_yaml_python_tags_are_refused_without_running_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.yaml").write_text("rounds: !!python/object/apply:os.system ['touch pwned']\n")
    out = CliRunner().invoke(main, ["run", "evil.yaml", *BASE], catch_exceptions=False)
    assert out.exit_code != 0
    line = one_error_line(out.output)
    assert "evil.yaml" in line and "line 1" in line and "!!python" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]


@pytest.mark.parametrize("text, problem", [("task: {name: digits\n", "expected ',' or '}'"),
                                           ("task:\n  name: digits\ntask:\n  name: synthetic\n", "duplicate key")])
def test_yaml_slips_are_named_without_blaming_tags(tmp_path, monkeypatch, text, problem):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slip.yaml").write_text(text)
    out = CliRunner().invoke(main, ["run", "slip.yaml", *BASE], catch_exceptions=False)
    line = one_error_line(out.output)
    assert out.exit_code != 0 and "slip.yaml is not plain YAML (line" in line and problem in line, line
    assert "tags" not in line


@pytest.mark.parametrize("args, named", [(["participation=100"], "participation must be"),
                                         (["task.hidden=[-5]"], "task.hidden must be"), (["evil.yaml"], "!!python")])
def test_the_installed_command_prints_one_line_and_no_traceback(tmp_path, args, named):
    """The same guarantee through a real process (stderr and stdout both checked)."""
    (tmp_path / "evil.yaml").write_text("seed: !!python/name:os.system\n")
    proc = subprocess.run([sys.executable, "-m", "fedgluon.exp.cli", "run", *args, "engine.name=plain"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert named in one_error_line(proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]
