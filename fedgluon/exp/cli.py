"""The ``fedgluon`` command line (click): run, sweep, tune, plot, list, bench, demo."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

RAY_TIP = "Tip: In future versions of Ray, Ray will no longer override"


class UsageLine(click.ClickException):
    """A click usage error (an unknown option or command, a bad or missing argument) shown as fedgluon shows
    every refusal: one ``error:`` line, exit code 2, here with a pointer to the command's ``--help``."""

    exit_code = 2

    def __init__(self, err: click.UsageError):
        path = err.ctx.command_path if err.ctx is not None else "fedgluon"
        super().__init__(f"{err.format_message().rstrip('.')}; see {path} --help")

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


@contextlib.contextmanager
def _usage_in_one_line() -> Iterator[None]:
    try:
        yield
    except click.UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # ``fedgluon`` alone: click prints the help
            raise
        raise UsageLine(err) from None


class _Commands(click.Group):
    """The ``fedgluon`` group: its commands' usage errors as :class:`UsageLine`."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _usage_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_in_one_line():
            return super().invoke(ctx)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedgluon")
def main() -> None:
    """fedgluon: communication-efficient federated training with layer-wise LMO optimizers."""
    import warnings

    from fedgluon.runtime import prepare_process

    prepare_process()  # this process exists to run fedgluon (fedgluon/runtime/process.py)
    # Ray's tip, at every ray.init (a parallel sweep's too), that a later Ray will stop hiding GPUs from tasks
    # without a GPU share: fedgluon relies on the hiding and names the setting (fedgluon.flower.engines.QUIET_ENV)
    warnings.filterwarnings("ignore", message=RAY_TIP, category=FutureWarning)


@main.command("list")
def list_cmd() -> None:
    """List methods, estimators, norms, geometry presets, schedules, compressors and value codecs, one per line."""
    from compressors.registry import COMPRESSORS
    from compressors.values import QSGD, VALUE_CODECS
    from fedgluon.algorithms import ALGORITHMS
    from fedgluon.config.schema import ENGINES
    from fedgluon.lmo.estimators import ESTIMATORS
    from fedgluon.lmo.geometry import NORM_NAMES, PRESETS
    from fedgluon.lmo.optim import METHODS
    from fedgluon.lmo.radius import SCHEDULES
    from fedgluon.tasks.data.partition import SCHEMES
    from fedgluon.tasks.registry import TASKS

    for title, names in [("algorithms", sorted(ALGORITHMS)), ("tasks", sorted(TASKS)), ("partitions", SCHEMES),
                         ("engines", ENGINES), ("optimizer methods", list(METHODS)), ("estimators", ESTIMATORS),
                         ("norms", NORM_NAMES), ("geometry presets", PRESETS), ("radius schedules", SCHEDULES),
                         ("compressors", sorted(COMPRESSORS)),
                         (f"value codecs (compressor.values; qsgd takes compressor.levels, default {QSGD().levels})",
                          VALUE_CODECS)]:
        click.echo(f"{title}: {', '.join(names)}")


ENGINE_CHOICES = ["ray", "inprocess", "plain"]


def _with_engine(args: tuple[str, ...], engine: str | None) -> tuple[str, ...]:
    """``args`` with the override ``engine.name=ENGINE`` last (so it wins) when ``--engine`` was given."""
    return (*args, f"engine.name={engine}") if engine else args


def _fail(err: Exception) -> None:
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


@contextlib.contextmanager
def _reported(hint: str | None) -> Iterator[None]:
    """A ConfigError as one ``error:`` line (exit 2); a stopped run as ``stopped: <reason>``, then ``hint``
    (formatted with the stop's ``checkpoint``) where a resume can get past the stop (exit 130 after
    SIGINT/SIGTERM, else 1)."""
    from fedgluon.config.schema import ConfigError
    from fedgluon.exp.resume import resumable
    from fedgluon.sim.checkpoint import RunInterrupted, RunStopped

    try:
        yield
    except ConfigError as err:
        _fail(err)
    except RunStopped as err:
        click.echo(f"\nstopped: {err}", err=True)
        if hint and err.checkpoint is not None and resumable(err):
            click.echo(hint.format(checkpoint=err.checkpoint), err=True)
        sys.exit(130 if isinstance(err, RunInterrupted) else 1)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), help="override engine.name")
@click.option("--overwrite", is_flag=True,
              help="replace an existing run directory (only one that fedgluon created and no run is using)")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="continue the unfinished run in this directory from its checkpoint (OVERRIDES may change "
                   "engine, network and output settings, threads, timeouts, faults and max_failed_rounds only)")
def run(config: str | None, overrides: tuple[str, ...], engine: str | None, overwrite: bool, quiet: bool,
        resume_dir: str | None) -> None:
    """Run CONFIG (a YAML file; defaults when omitted) with key=value OVERRIDES.

    With no arguments: 10 synthetic clients, Gluon-EF21-SARAH with top-5% uplink, 30 rounds on Ray.
    SIGINT/SIGTERM stop the run after the current round with a checkpoint; --resume continues it.
    """
    from fedgluon.config.schema import ConfigError, load
    from fedgluon.exp.experiment import run as run_experiment

    if config is not None and "=" in config and not Path(config).exists():
        overrides, config = (config, *overrides), None
    extra = list(_with_engine(overrides, engine))
    with _reported("resume with: fedgluon run --resume {checkpoint.parent}"):
        if resume_dir is not None:
            if config is not None:
                raise ConfigError("--resume takes the run's own config.yaml; pass overrides only, not a CONFIG file")
            saved = Path(resume_dir) / "config.yaml"
            if not saved.exists():
                raise ConfigError(f"{resume_dir} is not a run directory (no config.yaml)")
            cfg = load(saved, extra, own_run=True, overwrite=overwrite)  # with --overwrite: refused by the run
            out = run_experiment(cfg, progress=not quiet, out_dir=resume_dir, resume=True)
        else:
            out = run_experiment(load(config, extra, overwrite=overwrite), progress=not quiet)
    summary = json.loads((out / "summary.json").read_text())
    click.echo(f"\n{out}")
    for key in ("algorithm task rounds final_test_loss final_test_accuracy final_val_loss final_val_accuracy "
                "uplink_bits_per_client downlink_bits_total sim_time rejected failed wall_time").split():
        value = summary.get(key)
        if value is None and "_val_" in key:  # no validation split
            continue
        click.echo(f"  {key:24s} {value:.6g}" if isinstance(value, float) else f"  {key:24s} {value}")
    click.echo(f"  files: {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("args", nargs=-1)
@click.option("--name", help="sweep directory name (default: sweep-<base run name>)")
@click.option("--parallel", default=0, type=int, help="run members as N parallel Ray tasks (plain engine)")
@click.option("--engine", type=click.Choice(ENGINE_CHOICES), help="override engine.name of every member")
@click.option("--quiet", is_flag=True, help="no line per member and no summary table")
@click.option("--target", type=float, help="test accuracy that bits_to_target counts up to, kept for the sweep "
                                           "[default: 95% of the best member's final accuracy]")
def sweep(config: str | None, args: tuple[str, ...], name: str | None, parallel: int, engine: str | None,
          quiet: bool, target: float | None) -> None:
    """Sweep CONFIG over a grid: key=[a,b,c] axes (seed=[0,1,2] for seeds), key=value overrides."""
    from fedgluon.config.schema import ConfigError
    from fedgluon.exp.sweep import sweep as run_sweep

    if config is not None and "=" in config and not Path(config).exists():
        args, config = (config, *args), None
    args = _with_engine(args, engine)
    with _reported("continue with the same sweep command: complete members are kept and this one resumes from "
                   "{checkpoint}"):
        if parallel > 0 and engine not in (None, "plain"):
            raise ConfigError(f"--parallel runs every member on the plain engine; --engine {engine} cannot go "
                              f"with it (use --engine plain, or no --parallel)")
        out = run_sweep(config, args, name=name, progress=not quiet, parallel=parallel, target=target)
    import pandas as pd

    table = pd.read_csv(out / "table.csv") if (out / "table.csv").exists() else pd.DataFrame()
    click.echo(f"\n{out}")
    if not table.empty and not quiet:
        cols = [c for c in ("config final_test_accuracy_mean final_test_accuracy_std uplink_bits_per_client_mean "
                            "bits_to_target_mean bits_to_target_count").split() if c in table]
        click.echo(table[cols].to_string(index=False))
        if "bits_to_target_mean" in table and table["target_accuracy"].notna().any():
            given = json.loads((out / "sweep.json").read_text()).get("target") is not None
            why = "--target" if given else "95% of the best member's final accuracy"
            click.echo(f"bits_to_target: uplink bits per client until test accuracy "
                       f"{float(table['target_accuracy'].iloc[0]):.4g} ({why}), mean over the bits_to_target_count "
                       f"seeds that reached it")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.argument("args", nargs=-1)
@click.option("--algorithm", "algorithms", multiple=True,
              help="an algorithm name, or a YAML mapping of the whole algorithm section; repeat for several "
                   "(default: the config's algorithm)")
@click.option("--metric", default="final_test_loss", show_default=True)
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--name", default="tune", show_default=True, help="tune directory under output.dir")
@click.option("--search", type=click.Choice(["grid", "random"]), default="grid", show_default=True,
              help="every grid point, or --samples random points of the grid")
@click.option("--samples", type=int, default=None, help="trials per algorithm with --search random [default: 10]")
@click.option("--scheduler", type=click.Choice(["asha", "fifo"]), default="asha", show_default=True,
              help="ASHA stops poor trials early (over rounds); fifo runs every trial to the end")
@click.option("--grace-period", type=int, default=None,
              help="ASHA: rounds before a trial can be stopped [default: eval_every]")
@click.option("--reduction-factor", type=float, default=3.0, show_default=True, help="ASHA: keep 1/N at each rung")
@click.option("--cpus-per-trial", type=float, default=1.0, show_default=True)
@click.option("--gpus-per-trial", type=float, default=0.0, show_default=True)
@click.option("--parallel", default=0, type=int, help="trials at once (0: as many as the CPUs allow)")
@click.option("--storage-path", default=None,
              help="Ray Tune's experiment storage (default: the tune directory); on several nodes a path all of "
                   "them reach (NFS, s3://...)")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="continue the interrupted tune in this directory (no CONFIG, ARGS or other options)")
@click.option("--quiet", is_flag=True, help="no line per finished trial")
@click.option("--verbose", is_flag=True, help="Ray Tune's own progress tables and the trials' logs")
def tune(config: str | None, args: tuple[str, ...], algorithms: tuple[str, ...], resume_dir: str | None, quiet: bool,
         verbose: bool, **options: Any) -> None:
    """Tune each algorithm over the grid in ARGS (e.g. "algorithm.lr=[0.01,0.03,0.1]") on Ray Tune and print
    the best; writes <output.dir>/<name>/ (tuned.csv, best.json, <algorithm>/best.yaml; README, "Tuning (Ray
    Tune)")."""
    from fedgluon.config.schema import ConfigError
    from fedgluon.exp.tuning import TuneIncomplete, resume
    from fedgluon.exp.tuning import tune as run_tune

    if config is not None and "=" in config and not Path(config).exists():
        args, config = (config, *args), None
    try:
        with _reported(None):
            if resume_dir is not None:
                if config is not None or args or algorithms:
                    raise ConfigError("--resume continues the tune as it was asked; pass no CONFIG, ARGS or "
                                      "--algorithm")
                out = resume(resume_dir, progress=not quiet, verbose=verbose)
            else:
                from omegaconf import OmegaConf

                algs = [OmegaConf.to_container(OmegaConf.create(a)) if a.strip().startswith("{") else a.strip()
                        for a in algorithms]
                out = run_tune(config, args, algs, progress=not quiet, verbose=verbose, **options)
    except TuneIncomplete as err:
        click.echo(f"error: the tune did not finish ({err}); resume with: fedgluon tune --resume {err.tune_dir}",
                   err=True)
        sys.exit(1)
    import pandas as pd

    metric = json.loads((out / "tune.json").read_text())["metric"]
    table = pd.read_csv(out / "tuned.csv")
    click.echo(f"\n{out}")
    click.echo(table[table["best"]][["algorithm", "config", "seed", "rounds", metric]].to_string(index=False))
    done = table[table["complete"]]
    if len(done):
        click.echo(f"{len(done)} of {len(table)} trials ran every round; {int(table['rounds'].sum())} rounds run, "
                   f"{int(done['rounds'].max()) * len(table)} without early stopping")


@main.command()
@click.argument("directories", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="where to write the comparison figure [default: curves.png here; one sweep: its curves.png]")
def plot(directories: tuple[str, ...], out: str | None) -> None:
    """Redraw one run's plots.png, or one sweep's table.csv, pareto.png and curves.png; with several run or
    sweep directories (or --out), draw them together: test loss and accuracy against cumulative uplink bits,
    rounds and simulated time, one curve per configuration (mean over seeds, min–max band)."""
    import pandas as pd

    from fedgluon.exp.plots import PlotError, bit_convention, compare, plot_run
    from fedgluon.exp.sweep import summarise

    d = Path(directories[0])
    try:
        if len(directories) == 1 and out is None and (d / "sweep.json").exists():
            notes: list[str] = []
            summarise(d, echo=notes.append)
            click.echo("\n".join([*notes, str(d / "pareto.png")]))
            if not any("curves.png not drawn" in n for n in notes):
                click.echo(d / "curves.png")
        elif len(directories) == 1 and out is None and (d / "metrics.csv").exists():
            plot_run(pd.read_csv(d / "metrics.csv"), d / "plots.png", title=d.name,
                     bits_label=f"uplink bits per client ({bit_convention(d)} convention)")
            click.echo(d / "plots.png")
        else:
            _, drawn = compare(directories, out or "curves.png")
            for note in drawn:
                click.echo(f"note: {note}")
            click.echo(out or "curves.png")
    except PlotError as err:
        _fail(err)
    except OSError as err:  # a figure that cannot be written
        where = f"--out {out}" if out else (err.filename or "the figure")
        _fail(OSError(f"{where} cannot be written: {err.strerror or err}"))


BENCHMARKS = {"lmo": "benchmarks.bench_lmo", "compressors": "benchmarks.bench_compressors",
              "engines": "benchmarks.bench_engines", "transport": "benchmarks.bench_transport",
              "memory": "benchmarks.bench_memory"}


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("which", type=click.Choice([*BENCHMARKS, "all"]), default="all")
@click.option("--quick", is_flag=True, help="smaller sizes and fewer repeats")
@click.option("--against", "rev", default=None, metavar="REV",
              help="also run the benchmark from git revision REV, alternating with this tree, and print the "
                   "ratios of the medians (benchmarks/against.py)")
@click.option("--pairs", default=3, show_default=True, type=int, help="with --against: runs of each tree")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def bench(which: str, quick: bool, rev: str | None, pairs: int, extra: tuple[str, ...]) -> None:
    """Run the benchmarks (LMO vs its matmul bound and torch.optim.Muon, compressors, engines, a block's
    record through Ray, memory per client); each prints ratios. Arguments after -- go to the
    benchmark (one benchmark only), e.g. fedgluon bench engines -- --sizes 200 --rounds 8 --repeats 3."""
    import importlib

    if extra and which == "all":
        raise click.BadParameter("arguments after -- go to one benchmark; name it", param_hint="WHICH")
    if pairs < 1:
        raise click.BadParameter(f"must be at least 1, got {pairs}", param_hint="--pairs")
    args = (["--quick"] if quick else []) + list(extra)
    for name in (BENCHMARKS if which == "all" else [which]):
        click.echo(f"=== {name}")
        if rev is None:
            importlib.import_module(BENCHMARKS[name]).main(args)
            continue
        from benchmarks.against import compare

        try:
            compare(rev, BENCHMARKS[name], args, pairs, echo=click.echo)
        except (RuntimeError, OSError) as err:
            _fail(err)


@main.command()
@click.option("--method", default="scion", show_default=True, help="optimizer method (see `fedgluon list`)")
@click.option("--lr", default=0.02, show_default=True, type=float, help="base radius γ")
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
def demo(method: str, lr: float, epochs: int, seed: int) -> None:
    """Train an MLP on scikit-learn's digits with fedgluon.lmo.optim.Gluon and print test accuracy."""
    import torch
    import torch.nn.functional as F

    from fedgluon.lmo.optim import METHODS, Gluon, minibatch_epoch
    from fedgluon.tasks.data.tabular import load_sklearn
    from fedgluon.tasks.models import MLP
    from fedgluon.tasks.registry import stratified_split

    if method not in METHODS:
        raise click.BadParameter(f"must be one of {list(METHODS)}", param_hint="--method")
    torch.manual_seed(seed)
    Xtr, Xte, ytr, yte = (torch.from_numpy(a) for a in stratified_split(*load_sklearn("digits"), 0.25, seed))
    model = MLP(64, (128, 128), 10)
    opt = Gluon(model, lr=lr, method=method, seed=seed)
    click.echo(f"digits MLP 64-128-128-10, method={method}, lr={lr}, batch 32")

    def full_batch_closure():  # SARAH/PAGE refreshes use the whole training set
        opt.zero_grad()
        loss = F.cross_entropy(model(Xtr), ytr)
        loss.backward()
        return loss

    for epoch in range(epochs):
        minibatch_epoch(opt, model, Xtr, ytr, 32, refresh_closure=full_batch_closure)
        with torch.no_grad():
            acc = (model(Xte).argmax(1) == yte).float().mean().item()
            loss = F.cross_entropy(model(Xtr), ytr).item()
        click.echo(f"epoch {epoch + 1:3d}  train loss {loss:.4f}  test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
