"""benchmarks/against.py: a benchmark run alternately from this tree and another revision."""

import subprocess
from pathlib import Path

import pytest

from benchmarks.against import compare, parse, report


def test_lines_pair_up_by_their_words_and_ratios_come_from_medians():
    def run(t, s):
        return parse(f"machine: AVX2, torch 2.13.0+cpu, 2 cores\nclients   engine   s/round\n"
                     f"  200   ray, blocks of 100   {t:9.3f}   {s:>5s}\n\nratio {t * 10:.2f}x (target <= 1.5)\n")
    new = [run(0.100, "12.9"), run(0.120, "9.5"), run(0.110, "9.9")]
    old = [run(0.200, "9.1"), run(0.220, "8.0"), run(0.210, "8.5")]
    assert ("machine: AVX2, torch 2.13.0+cpu, # cores", 0) in new[0]  # a version is not a number
    new[0].update(parse("a line only one run printed 1.0"))  # not in every run: left out
    for i, r in enumerate(new + old):
        r.update(parse(f"sizes {{'a': {i}.5}}"))  # braces in a line are text
    assert report(new, old)[-1] == "sizes {'a': 1.5}   | new/old 0.33"  # medians 1.5 (0.5, 1.5, 2.5) / 4.5
    lines = report(new, old)
    assert len(lines) == 5  # the padding of a right-aligned number does not split a row; blank lines go
    assert lines[0] == "machine: AVX2, torch 2.13.0+cpu, 2 cores"  # nothing moved: no ratio
    assert lines[1] == "clients   engine   s/round"  # a header, as it is
    assert lines[2].split("|")[0].split() == ["200", "ray,", "blocks", "of", "100", "0.110", "9.9"]  # as printed
    assert lines[2].endswith("new/old 0.52 1.16")  # medians 0.110 / 0.210 and 9.9 / 8.5
    assert lines[3].startswith("ratio 1.10x (target <= 1.5)") and lines[3].endswith("new/old 0.52")


def test_thousands_separators_keep_a_number_whole():
    runs = [parse(f"a 109,066-parameter model, {n:,} rows, sizes 1.5,2.5") for n in (1_000_000, 2_000_000, 3_000_000)]
    assert report(runs[:2], runs[2:]) == ["a 109,066-parameter model, 1,500,000 rows, sizes 1.5,2.5   | new/old 0.50"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_compare_runs_both_revisions_from_their_own_trees(tmp_path):
    repo = tmp_path / "repo"
    (repo / "toy").mkdir(parents=True)
    (repo / "toy" / "__init__.py").write_text("")
    probe = repo / "toy" / "probe.py"
    probe.write_text("import os\nprint('cost', 2.0, 'cwd files', len(os.listdir('.')))\n")
    _git(repo, "init", "-q")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "old")
    probe.write_text("import os\nprint('cost', 1.0, 'cwd files', len(os.listdir('.')))\n")  # uncommitted: this tree
    said = []
    lines = compare("HEAD", "toy.probe", pairs=2, repo=repo, echo=said.append)
    assert lines == ["cost 1.0 cwd files 0   | new/old 0.50"]  # each ran its own code, from an empty directory
    assert sum(s.startswith("# pair") for s in said) == 4
    worktrees = subprocess.run(["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True).stdout
    assert worktrees.count("\n") == 1
    script = tmp_path / "probe_script.py"  # an ad-hoc script runs against each tree's packages
    script.write_text("import toy.probe\n")
    lines = compare("HEAD", str(script), pairs=1, repo=repo, echo=said.append)
    assert lines == ["cost 1.0 cwd files 0   | new/old 0.50"]
    with pytest.raises(RuntimeError, match="cannot check out 'no-such-rev'"):
        compare("no-such-rev", "toy.probe", pairs=1, repo=repo, echo=said.append)
    with pytest.raises(ValueError, match="pairs"):
        compare("HEAD", "toy.probe", pairs=0, repo=repo)


def test_cli_passes_arguments_after_the_separator_to_one_benchmark():
    from click.testing import CliRunner

    from fedgluon.exp.cli import main

    out = CliRunner().invoke(main, ["bench", "all", "--", "--sizes", "4"])
    assert out.exit_code != 0 and "name it" in out.output
    out = CliRunner().invoke(main, ["bench", "engines", "--against", "HEAD", "--pairs", "0"])
    assert out.exit_code != 0 and "--pairs" in out.output
    out = CliRunner().invoke(main, ["bench", "engines", "--", "--sizes", "4", "--rounds", "2", "--plain-only"])
    assert out.exit_code == 0, out.output
    assert "plain, blocks of 2" in out.output and "     10 " not in out.output  # the sizes given, not the default


def test_command_line_splits_at_the_separator(monkeypatch):
    import benchmarks.against as against

    seen = {}
    monkeypatch.setattr(against, "compare", lambda rev, module, args, pairs: seen.update(
        rev=rev, module=module, args=list(args), pairs=pairs))
    against.main(["HEAD~1", "--pairs", "4", "--", "benchmarks.bench_engines", "--sizes", "200", "--pairs", "9"])
    assert seen == {"rev": "HEAD~1", "module": "benchmarks.bench_engines", "args": ["--sizes", "200", "--pairs", "9"],
                    "pairs": 4}
    with pytest.raises(SystemExit):
        against.main(["HEAD"])
