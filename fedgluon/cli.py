"""The ``fedgluon`` command line (click). Experiment commands (run, sweep, plot) come later."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fedgluon")
def main() -> None:
    """fedgluon: communication-efficient federated training with layer-wise LMO optimizers."""


@main.command("list")
def list_cmd() -> None:
    """List methods, estimators, norms, geometry presets, schedules and compressors, one per line."""
    from fedgluon.estimators import ESTIMATORS
    from fedgluon.geometry import NORM_NAMES, PRESETS
    from fedgluon.optim import METHODS
    from fedgluon.radius import SCHEDULES

    try:
        from compressors.registry import COMPRESSORS
        compressors = sorted(COMPRESSORS)
    except ImportError:  # pragma: no cover - the compressors package ships with fedgluon
        compressors = []
    for title, names in [("optimizer methods", list(METHODS)), ("estimators", ESTIMATORS), ("norms", NORM_NAMES),
                         ("geometry presets", PRESETS), ("radius schedules", SCHEDULES),
                         ("compressors", compressors)]:
        click.echo(f"{title}: {', '.join(names)}")


@main.command()
@click.option("--method", default="scion", show_default=True, help="optimizer method (see `fedgluon list`)")
@click.option("--lr", default=0.02, show_default=True, type=float, help="base radius γ")
@click.option("--epochs", default=10, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
def demo(method: str, lr: float, epochs: int, seed: int) -> None:
    """Train an MLP on scikit-learn's digits with fedgluon.optim.Gluon and print test accuracy."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fedgluon.models import MLP
    from fedgluon.optim import METHODS, Gluon

    if method not in METHODS:
        raise click.BadParameter(f"must be one of {list(METHODS)}", param_hint="--method")
    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    model = MLP(64, (128, 128), 10)
    opt = Gluon(model, lr=lr, method=method, seed=seed)
    click.echo(f"digits MLP 64-128-128-10, method={method}, lr={lr}, batch 32")

    def full_batch_closure():  # SARAH/PAGE refreshes use the whole training set
        opt.zero_grad()
        loss = F.cross_entropy(model(Xtr), ytr)
        loss.backward()
        return loss

    for epoch in range(epochs):
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(Xtr), 32):
            idx = perm[i:i + 32]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(Xtr[idx]), ytr[idx])
                loss.backward()
                return loss
            opt.step(closure, refresh_closure=full_batch_closure)
        with torch.no_grad():
            acc = (model(Xte).argmax(1) == yte).float().mean().item()
            loss = F.cross_entropy(model(Xtr), ytr).item()
        click.echo(f"epoch {epoch + 1:3d}  train loss {loss:.4f}  test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
