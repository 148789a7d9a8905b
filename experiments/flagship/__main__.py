"""``python -m experiments.flagship {tune,study,report}``: the flagship study (experiments/README.md).

    python -m experiments.flagship tune            # phase 1: tune every method on seed 0, write chosen.yaml
    python -m experiments.flagship study           # phase 2: 3 seeds at the chosen values, then the report
    python -m experiments.flagship study --quick   # the whole pipeline in a few minutes (not a result)
    python -m experiments.flagship report          # the tables and figures again, from the study's runs

A tune that never looks at the test data, then the study on seeds it never ran (experiments/README.md):

    python -m experiments.flagship tune --set task.validation_fraction=0.1 --metric final_val_loss --chosen clean.yaml
    python -m experiments.flagship study --chosen clean.yaml --seeds 1 2 3 --out runs/flagship-clean
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.flagship import plan
from experiments.flagship.report import chosen_table, report
from experiments.flagship.study import changes_of, run_study
from experiments.flagship.tune import choose, run_tunes, summary_lines, write_chosen

HEADER = ("# Phase 1 of the flagship study (python -m experiments.flagship tune): per task and method, the\n"
          "# chosen value, the grid searched (with any one-step extension beyond an edge), the value's index in\n"
          "# it, whether it still lies on the grid's edge, and the metric it was ranked by (final_test_loss, or\n"
          "# final_val_loss on a validation split) of seed 0 at every value whose trial ran every round (ASHA stops\n"
          "# the others early).\n")


def selected(methods: list[plan.Method], labels: list[str], widen: bool) -> list[plan.Method]:
    """The methods named by ``--method``; with ``widen``, also those sharing an algorithm name with one of
    them: a sweep member's directory name tells such methods apart by a hash only when they run side by
    side, so a subset alone would write (and look for) other directories than the whole study's."""
    unknown = sorted(set(labels) - {m.label for m in methods})
    if unknown:
        raise plan.PlanError(f"--method must be labels of methods.yaml, got unknown {unknown}")
    names = {m.name for m in methods if m.label in labels}
    out = [m for m in methods if m.label in labels or (widen and m.name in names)]
    extra = [m.label for m in out if m.label not in labels]
    if extra:
        print(f"--method: also {', '.join(extra)} (the same algorithm name as a method selected: they are run "
              "and reported together, under the whole study's directory names)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.flagship", description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["tune", "study", "report"])
    ap.add_argument("--task", action="append", choices=sorted(plan.TASKS), help="a task (repeat; default: both)")
    ap.add_argument("--method", action="append", help="a method label of methods.yaml (repeat; default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="study, report: one seed, 3 rounds, under runs/flagship-quick")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (one CPU each) [default: 2]")
    ap.add_argument("--out", type=Path, default=None, help="where the runs go [default: runs/flagship]")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (repeat), e.g. --set rounds=2 for a smoke test")
    ap.add_argument("--chosen", type=Path, default=plan.CHOSEN_FILE,
                    help="the chosen values: tune writes them, study and report read them [default: %(default)s]")
    ap.add_argument("--no-extend", action="store_true", help="tune: do not try one step beyond a grid edge")
    ap.add_argument("--metric", choices=plan.METRICS, default=plan.METRIC,
                    help="tune: what to rank by; final_val_loss needs --set task.validation_fraction=F, "
                         "0 < F < 1 [default: %(default)s]")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help=f"study, report: the seeds [default: {' '.join(map(str, plan.SEEDS))}; --quick: 0]")
    args = ap.parse_args(argv)
    try:
        methods = plan.load_methods()
        if args.method:
            methods = selected(methods, args.method, widen=args.phase != "tune")
        tasks = args.task or list(plan.TASKS)
        out = (args.out or Path("runs") / ("flagship-quick" if args.quick else "flagship")).resolve()
        if args.phase == "tune" and args.quick:
            raise plan.PlanError("--quick is for study and report (phase 1's ASHA needs whole runs); for a short "
                                 "tune give --set rounds=R --chosen PATH")
        if args.phase == "tune" and args.set and args.chosen == plan.CHOSEN_FILE:
            raise plan.PlanError("tune with --set must write its values elsewhere: give --chosen PATH "
                                 f"(the committed {plan.CHOSEN_FILE.name} holds the study's values)")
        if args.phase == "tune":
            for task in tasks:
                run_tunes(task, methods, out / "tune", overrides=args.set, parallel=args.parallel, metric=args.metric)
                chosen = choose(task, methods, out / "tune", overrides=args.set, extend_edges=not args.no_extend,
                                parallel=args.parallel, metric=args.metric)
                write_chosen({task: chosen}, args.chosen, header=HEADER)
                print(f"{task}: chosen values (written to {args.chosen}):", *summary_lines(chosen), sep="\n")
            return 0
        seeds = tuple(args.seeds or ((0,) if args.quick else plan.SEEDS))
        chosen = plan.load_chosen(args.chosen)
        dirs = {t: out / t for t in tasks}
        if args.phase == "report" and not args.seeds:  # the seeds the study ran, where it says
            seeds = next((tuple(s) for d in dirs.values() if (s := plan.study_seeds(d))), seeds)
        if args.phase == "study":
            dirs = run_study(tasks, methods, chosen, out, seeds=seeds, quick=args.quick, parallel=args.parallel,
                             overrides=args.set)
        (out / "results").mkdir(parents=True, exist_ok=True)
        (out / "results" / "chosen.md").write_text(chosen_table(methods, chosen, tasks))
        for task, d in dirs.items():
            print(f"\n## {task}\n\n" + report(task, d, methods, chosen, seeds, out / "results",
                                                     overrides=changes_of(args.quick, args.set)))
        print(f"tables and figures: {out / 'results'}")
        return 0
    except (plan.PlanError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
