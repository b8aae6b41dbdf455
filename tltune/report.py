"""A Markdown report with plots, from result directories alone (nothing is re-run).

It sets every declared experiment beside the seed's reference accuracy, lists the top trials
of each, and draws learning curves, accuracy against learning rate, and fine-tuning against
feature extraction. Experiments without results show as "not run", failed ones with their
reason. Damaged files are skipped with a warning (see :mod:`tltune.results`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from tltune import storage
from tltune.errors import UserError
from tltune.experiments import EXPERIMENTS
from tltune.results import DATASET_NAMES, EXPERIMENT_FILE, SUMMARY_FILE, ExperimentResult, experiment_status, load_experiments

TOP_TRIALS = 5


def collect(paths: list[str | Path]) -> dict[str, ExperimentResult]:
    """The latest result of each experiment under ``paths`` (run directories or folders of
    them); a finished result beats a newer unfinished one."""
    found: dict[str, ExperimentResult] = {}
    for path in paths:
        path = storage.absolute(str(path))
        if not storage.exists(path):
            raise UserError(f"{path} does not exist: pass run directories or the folder holding them (./results)")
        if not storage.is_dir(path):
            raise UserError(f"{path} is a file: pass run directories or the folder holding them (./results)")
        run_dirs = {p.rsplit("/", 2)[0] for p in storage.find(path, EXPERIMENT_FILE)}
        for run_dir in sorted(run_dirs):
            for exp in load_experiments(run_dir):  # damaged experiments: skipped with a warning
                if _rank(exp) > _rank(found.get(exp.name)):
                    found[exp.name] = exp
    if not found:
        raise UserError(f"no tltune experiment under {', '.join(map(str, paths))}: run a sweep first")
    return found


def _rank(exp: ExperimentResult | None) -> tuple:
    if exp is None:
        return (-1, 0)
    finished = exp.finished
    return (int(finished), storage.mtime(storage.join(exp.path, SUMMARY_FILE if finished else EXPERIMENT_FILE)))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value, spec: str) -> str:
    """``value`` formatted if it is a number, else ``-`` (a damaged or foreign params.json)."""
    return format(value, spec) if _is_number(value) else "-"


def _config_text(config: dict) -> str:
    keys = ("optimizer", "activation", "lr", "epochs", "batch_size", "image_size")
    return ", ".join(f"{k}={config[k]:.3g}" if isinstance(config[k], float) else f"{k}={config[k]}" for k in keys if config.get(k) is not None)


def reference_table(found: dict[str, ExperimentResult]) -> str:
    lines = [
        "| Dataset | Model type | lr | Epochs | Reference | Ours (test) | Difference | Our best configuration | Run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, declared in EXPERIMENTS.items():
        exp = found.get(name)
        label = exp.record.get("label", declared.label) if exp else declared.label
        reference = f"{declared.reference_accuracy:.2f}%" if declared.reference_accuracy is not None else "(never filled)"
        ours, diff, config, run = "not run", "", "", ""
        best = exp.best() if exp else None
        if exp is not None:
            run = f"`{exp.path.rstrip('/').rsplit('/', 2)[-2]}`"
            ours = "no finished trial"
        if best is not None:
            config = _config_text(best["config"]) + f" ({best.get('epochs_trained')} epochs trained)"
            if "test_acc" in best:
                ours = _pct(best["test_acc"])
                if declared.reference_accuracy is not None:
                    diff = f"{100 * best['test_acc'] - declared.reference_accuracy:+.2f}"
            else:
                ours = f"unfinished (val {_pct(best['val_acc'])})"
        if exp is not None and (exp.failure is not None or exp.all_diverged):
            ours, diff = experiment_status(exp), ""
        lines.append(
            f"| {DATASET_NAMES.get(declared.dataset, declared.dataset)} | {label} | {declared.reference['lr']:g} | "
            f"{declared.reference['epochs']} | {reference} | {ours} | {diff} | {config} | {run} |"
        )
    return "\n".join(lines)


def transfer_gain(found: dict[str, ExperimentResult]) -> str:
    tested = {}
    for name in ("mnist_to_svhn-finetune", "mnist_to_svhn-feature_extract", "mnist_to_svhn-scratch"):
        best = found[name].best() if name in found else None
        tested[name] = best.get("test_acc") if best else None
    control = tested["mnist_to_svhn-scratch"]
    if control is None:
        return "MNIST -> SVHN: not run (needs SVHN; `python sweeps/mnist_to_svhn.py`)."
    lines = [f"MNIST -> SVHN, SVHN test accuracy; the control (same CNN from scratch) reaches {_pct(control)}:"]
    for name, label in (("mnist_to_svhn-finetune", "fine-tuned"), ("mnist_to_svhn-feature_extract", "only last Linear trained")):
        if tested[name] is not None:
            lines.append(f"- pretrained on MNIST, {label}: {_pct(tested[name])} ({100 * (tested[name] - control):+.2f} points over the control)")
    return "\n".join(lines)


def top_trials(exp: ExperimentResult) -> str:
    scored = sorted(exp.trials, key=lambda t: t.score, reverse=True)[:TOP_TRIALS]
    lines = ["| Trial | Optimizer | Activation | lr | Epochs run / planned | Val acc | Status |", "|---|---|---|---|---|---|---|"]
    for t in scored:
        planned = t.config.get("epochs")
        if t.errored or t.diverged:
            status = "error" if t.errored else f"diverged: {t.last.get('stop_reason', '')}"
        elif not t.last:
            status = "no result yet"
        else:
            status = "stopped early (ASHA)" if isinstance(planned, int) and t.last["training_iteration"] < planned else "complete"
        epochs = t.last["training_iteration"] if t.last else 0
        lines.append(
            f"| {t.name.split('-')[0]} | {t.config.get('optimizer')} | {t.config.get('activation', '-')} | "
            f"{_fmt(t.config.get('lr'), '.2e')} | {epochs} / {planned if planned is not None else '-'} | "
            f"{_pct(t.score) if t.score > -math.inf else '-'} | {status} |"
        )
    return "\n".join(lines)


def plot_learning_curves(found, out: Path) -> Path:
    import matplotlib.pyplot as plt

    names = [n for n in found if found[n].trials]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for t in sorted(found[name].trials, key=lambda t: t.score, reverse=True)[:3]:
            rows = [r for r in t.epochs if _is_number(r.get("val_acc"))]
            epochs = [r["training_iteration"] for r in rows]
            ax.plot(epochs, [100 * r["val_acc"] for r in rows], marker="o", label=f"{t.config.get('optimizer')} lr={_fmt(t.config.get('lr'), '.1e')}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy (%)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_accuracy_vs_lr(found, out: Path) -> Path:
    import matplotlib.pyplot as plt

    names = [n for n in found if len(found[n].trials) > 1]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    markers = dict(zip(["relu", "tanh", "sigmoid", "leaky_relu", "elu", "gelu"], "os^vDP"))
    colors = dict(zip(["adam", "adamw", "sgd", "rmsprop", "adagrad"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, name in zip(axes.flat, names):
        for t in found[name].trials:
            if t.score > -math.inf and _is_number(t.config.get("lr")):
                ax.scatter(
                    t.config["lr"], 100 * t.score, color=colors.get(t.config.get("optimizer"), "gray"),
                    marker=markers.get(t.config.get("activation"), "o"), s=36,
                )  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final val accuracy (%)")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=o) for o, c in colors.items()]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=a) for a, m in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path = out / "accuracy_vs_lr.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_finetune_vs_extract(found, out: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = ["cifar10", "mnist", "svhn"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.2
    for i, (mode, what) in enumerate([("finetune", "ours"), ("finetune", "reference"), ("feature_extract", "ours"), ("feature_extract", "reference")]):
        values = []
        for dataset in datasets:
            name = f"{dataset}-alexnet-{mode}"
            if what == "reference":
                values.append(EXPERIMENTS[name].reference_accuracy)
            else:
                best = found[name].best() if name in found else None
                values.append(100 * best["test_acc"] if best and "test_acc" in best else np.nan)
        ax.bar(np.arange(3) + (i - 1.5) * width, values, width, label=f"{mode.replace('_', ' ')} ({what})", hatch="//" if what == "reference" else None)
    ax.set_xticks(range(3), [DATASET_NAMES[d] for d in datasets])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("AlexNet: fine-tuning vs feature extraction (missing bar: not run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "finetune_vs_feature_extraction.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    found = collect(paths)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: pass --out a folder for report.md and its plots")
    try:
        return _write(paths, found, out)
    except OSError as exc:
        reason = exc.strerror or " ".join(str(exc).split())
        raise UserError(f"cannot write the report to {out}: {reason}") from None


def _write(paths: list[str | Path], found: dict[str, ExperimentResult], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_learning_curves(found, out), plot_accuracy_vs_lr(found, out), plot_finetune_vs_extract(found, out)]
    parts = [
        "# tltune results",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {', '.join(f'`{p}`' for p in paths)}. "
        "Ours = test accuracy of the experiment's best trial, chosen on the validation split.",
        "## Against the reference",
        reference_table(found),
        transfer_gain(found),
        "## Top trials per experiment (by final validation accuracy)",
    ]
    for name, exp in found.items():
        parts += [f"### {name}", top_trials(exp)]
    parts += ["## Plots", *(f"![{p.stem}]({p.name})" for p in plots)]
    report = out / "report.md"
    report.write_text("\n\n".join(parts) + "\n")
    return report
