"""A Markdown report with plots, from result directories alone (nothing is re-run).

It sets every declared experiment beside the seed's reference accuracy, lists the top trials
of each, writes every trial with its stop reason to ``trials.csv``, and draws learning curves,
accuracy against learning rate, and fine-tuning against feature extraction (ours beside the
reference); per experiment, each trial's validation accuracy per epoch with its stop marked
and, where the sweep kept the Optuna study (``optuna.journal``), Optuna's optimization
history, parallel coordinates and parameter importances. Experiments without results show as
"not run", failed ones with their reason. Damaged files are skipped with a warning (see
:mod:`tltune.results`); the run directories are only read.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Iterator

from tltune import storage
from tltune.errors import UserError
from tltune.records import is_number
from tltune.experiments import ASSUMPTIONS, EXPERIMENTS, FAMILIES
from tltune.results import (
    ASHA_STOP,
    COMPLETED,
    DIVERGED,
    ERROR,
    EXPERIMENT_FILE,
    INTERRUPTED,
    OPTUNA_JOURNAL,
    SUMMARY_FILE,
    ExperimentResult,
    dataset_title,
    best_per_model_mode,
    model_mode_text,
    COMPUTE_UNITS,
    NEAR_BEST_POINTS,
    pareto_front,
    shown_config,
    accuracy_text,
    best_over_time,
    best_vs_reference,
    experiment_rows,
    experiment_status,
    load_experiments,
    reference_cap_note,
    search_wall_s,
    repeat_rows,
    spread,
    seed_accuracies,
    stop_kind,
    stop_reason,
    trial_rows,
    val_acc_of,
    warn_skip,
    write_trials_csv,
)

if TYPE_CHECKING:
    import optuna

TOP_TRIALS = 5
TRIALS_CSV = "trials.csv"
REPEATS_CSV = "repeats.csv"  # the reference and the best configuration, one row per seed
EXPERIMENTS_CSV = "experiments.csv"  # one row per experiment: what it spent, its accuracies over seeds
TRANSFER_MODES = ("finetune", "feature_extract")


def collect_runs(paths: list[str | Path]) -> dict[str, dict[str, ExperimentResult]]:
    """Every run directory under ``paths`` (run directories or folders of them), each with its
    experiments by name, in the order found."""
    runs: dict[str, dict[str, ExperimentResult]] = {}
    for path in paths:
        path = storage.absolute(str(path))
        if not storage.exists(path):
            raise UserError(f"{path} does not exist: pass run directories or the folder holding them (./results)")
        if not storage.is_dir(path):
            raise UserError(f"{path} is a file: pass run directories or the folder holding them (./results)")
        for run_dir in sorted({storage.parent(storage.parent(p)) for p in storage.find(path, EXPERIMENT_FILE)}):
            runs.setdefault(run_dir, {e.name: e for e in load_experiments(run_dir)})  # damaged experiments: skipped with a warning
    if not any(runs.values()):
        raise UserError(f"no tltune experiment under {', '.join(map(str, paths))}: run a sweep first")
    return runs


def collect(paths: list[str | Path]) -> dict[str, ExperimentResult]:
    """The latest result of each experiment under ``paths`` (run directories or folders of
    them); a finished result beats a newer unfinished one."""
    return latest(collect_runs(paths))


def latest(runs: dict[str, dict[str, ExperimentResult]]) -> dict[str, ExperimentResult]:
    found: dict[str, ExperimentResult] = {}
    for experiments in runs.values():
        for exp in experiments.values():
            if _rank(exp) > _rank(found.get(exp.name)):
                found[exp.name] = exp
    return found


def run_label(run_dir: str) -> str:
    return storage.name(run_dir)


def runs_side_by_side(runs: dict[str, dict[str, ExperimentResult]], out: Path) -> list[str]:
    """The same experiments across runs: one table with a column per run (the best trial's test
    accuracy, mean ± std over seeds where repeated), and per experiment in several runs the
    best validation accuracy against sweep time, one curve per run."""
    import matplotlib.pyplot as plt

    labels = {run_dir: run_label(run_dir) for run_dir in runs}
    names = list(dict.fromkeys(name for experiments in runs.values() for name in experiments))
    lines = ["| Experiment | " + " | ".join(f"`{label}`" for label in labels.values()) + " |", "|---|" + "---|" * len(labels)]
    for name in names:
        cells = []
        for run_dir in runs:
            exp = runs[run_dir].get(name)
            best = exp.best() if exp else None
            if exp is None:
                cells.append("-")
            elif exp.failure is not None or exp.all_diverged:
                cells.append(experiment_status(exp))
            elif best is not None and "test_acc" in best:
                tests = seed_accuracies(exp.summary, "best")
                cells.append(accuracy_text(tests) if tests else _pct(best["test_acc"]))
            elif best is not None:
                cells.append(f"{experiment_status(exp)} (val {_pct(best['val_acc'])})")
            else:
                cells.append(experiment_status(exp))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    parts = ["## Runs side by side", "Test accuracy of each experiment's best trial (mean ± std over seeds where repeated), per run:", "\n".join(lines)]
    for name in names:
        curves = {labels[run_dir]: best_over_time(runs[run_dir][name]) for run_dir in runs if name in runs[run_dir]}
        curves = {label: curve for label, curve in curves.items() if curve}
        if len(curves) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, curve in curves.items():
            minutes, accs = zip(*curve)
            ax.step(minutes, [100 * a for a in accs], where="post", marker="o", ms=3, label=label)
        ax.set_xlabel("minutes since the first trial started")
        ax.set_ylabel("best val accuracy so far (%)")
        ax.set_title(f"{name}: best validation accuracy against sweep time, per run", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{safe_name(name)}-runs-best_over_time.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        parts.append(f"![{name}: best val accuracy against sweep time, per run]({path.name})")
    return parts


def safe_name(name: str) -> str:
    """An experiment name as read from a record, made safe to be a file name under the report
    folder: a record's name is data, never a path (no separators, no leading dots)."""
    cleaned = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name).lstrip(".")
    return cleaned or "experiment"


def _rank(exp: ExperimentResult | None) -> tuple:
    if exp is None:
        return (-1, 0)
    finished = exp.finished
    return (int(finished), storage.mtime(storage.join(exp.path, SUMMARY_FILE if finished else EXPERIMENT_FILE)))


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"



def _fmt(value, spec: str) -> str:
    """``value`` formatted if it is a number, else ``-`` (a damaged or foreign params.json)."""
    return format(value, spec) if is_number(value) else "-"


def _config_text(config: dict, searched) -> str:
    shown = shown_config(config, searched)
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def seed_ran(found: dict[str, ExperimentResult]) -> bool:
    """Whether any of the seed's experiments is among those found: only then does the report
    list the seed's rows that did not run (a report of one's own sweep shows one's own)."""
    return any(name in EXPERIMENTS for name in found)


def reference_table(found: dict[str, ExperimentResult]) -> str:
    lines = [
        "| Dataset | Model type | lr | Epochs | Reference | Ours at the reference settings | Ours, best of the search | "
        "Best − ours at the reference settings | Difference to the seed | Trials | Epochs spent | Wall time | Our best configuration | Run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # the seed's rows (run or not, where any of them ran), then the user's own experiments (spec files) that ran
    for name in dict.fromkeys([*(EXPERIMENTS if seed_ran(found) else []), *found]):
        exp, declared = found.get(name), EXPERIMENTS.get(name)
        if declared is None:  # a user's experiment: what its record says
            record = exp.record
            declared = SimpleNamespace(label=record.label or name, dataset=record.dataset or "?", reference=record.reference or {},
                                       reference_accuracy=record.reference_accuracy if is_number(record.reference_accuracy) else None)  # fmt: skip
        label = (exp.record.label if exp.record.label is not None else declared.label) if exp else declared.label
        if declared.reference_accuracy is not None:
            reference = f"{declared.reference_accuracy:.2f}%"
        elif name not in EXPERIMENTS:
            reference = "-"
        else:  # the seed's MNIST -> SVHN cells are empty; the extended search has no cell at all
            reference = "(never filled)" if name in FAMILIES["mnist_to_svhn"] else "(not in the seed)"
        ours, diff, config, run = "not run", "", "", ""
        at_reference = vs_reference = trials = epochs = wall = ""
        best = exp.best() if exp else None
        if exp is not None:
            run = f"`{storage.name(storage.parent(exp.path))}`"
            ours = "no finished trial"
        if best is not None:
            config = _config_text(best["config"], exp.record.space or {}) + f" ({best.get('epochs_trained')} epochs trained)"
            if "test_acc" in best:
                best_runs, reference_runs = seed_accuracies(exp.summary, "best"), seed_accuracies(exp.summary, "reference")
                ours, at_reference = accuracy_text(best_runs) if best_runs else _pct(best["test_acc"]), accuracy_text(reference_runs)
                at_reference += reference_cap_note(exp) if reference_runs else ""
                vs_reference = best_vs_reference(exp.summary)
                if declared.reference_accuracy is not None:
                    diff = f"{100 * spread(best_runs or [best['test_acc']])[0] - declared.reference_accuracy:+.2f}"
            else:
                ours = f"unfinished (val {_pct(best['val_acc'])})"
        if exp is not None and exp.summary:
            trials, epochs = (value if value is not None else "" for value in (exp.summary.trials, exp.summary.epochs_spent))
            wall = f"{exp.summary.wall_s / 60:.1f} min" if is_number(exp.summary.wall_s) else ""
        if exp is not None and (exp.failure is not None or exp.all_diverged):
            ours, diff = experiment_status(exp), ""
        lines.append(
            f"| {dataset_title(declared.dataset)} | {label} | {_fmt(declared.reference.get('lr'), 'g')} | "
            f"{declared.reference.get('epochs', '-')} | {reference} | {at_reference} | {ours} | {vs_reference} | {diff} | {trials} | {epochs} | {wall} | {config} | {run} |"
        )
    return "\n".join(lines)


def assumptions_table() -> str:
    lines = ["| What the seed does not state | Our choice | Why |", "|---|---|---|"]
    lines += [f"| {what} | {choice} | {why} |" for what, choice, why in ASSUMPTIONS]
    return "\n".join(lines)


def transfer_gain(found: dict[str, ExperimentResult]) -> str:
    tested = {}
    for name in ("mnist_to_svhn-finetune", "mnist_to_svhn-feature_extract", "mnist_to_svhn-scratch"):
        best = found[name].best() if name in found else None
        tested[name] = best.get("test_acc") if best else None
    control = tested["mnist_to_svhn-scratch"]
    if control is None:
        return "MNIST -> SVHN: not run (needs SVHN; `python sweeps/mnist_to_svhn.py`)." if seed_ran(found) else ""
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
        status = stop_reason(t, exp)
        if status == DIVERGED:
            status += f": {t.last.get('stop_reason', '')}"
        lines.append(
            f"| {t.name.split('-')[0]} | {t.config.get('optimizer')} | {t.config.get('activation', '-')} | "
            f"{_fmt(t.config.get('lr'), '.2e')} | {t.epochs_run} / {planned if planned is not None else '-'} | "
            f"{_pct(t.score) if t.score > -math.inf else '-'} | {status} |"
        )
    return "\n".join(lines)


def save_grid(fig, axes, used: int, path: Path, bottom: float = 0.0) -> Path:
    """Save a grid of per-experiment panels: the unused panels hidden, ``bottom`` of the height
    left for a legend."""
    import matplotlib.pyplot as plt

    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_learning_curves(found, out: Path) -> Path:
    import matplotlib.pyplot as plt

    names = [n for n in found if found[n].trials]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for t in sorted(found[name].trials, key=lambda t: t.score, reverse=True)[:3]:
            rows = [r for r in t.epochs if is_number(r.get("val_acc"))]
            epochs = [r["training_iteration"] for r in rows]
            ax.plot(epochs, [100 * r["val_acc"] for r in rows], marker="o", label=f"{t.config.get('optimizer')} lr={_fmt(t.config.get('lr'), '.1e')}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val accuracy (%)")
        ax.legend(fontsize=7)
    return save_grid(fig, axes, len(names), out / "learning_curves.png")


def plot_accuracy_vs_lr(found, out: Path) -> Path:
    import matplotlib.pyplot as plt

    names = [n for n in found if len(found[n].trials) > 1]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    legend_h = 0.8  # inches below the plots for the legend
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.5, 5 * cols), 3.8 * rows + legend_h), squeeze=False)
    markers = dict(zip(["relu", "tanh", "sigmoid", "leaky_relu", "elu", "gelu"], "os^vDP"))
    colors = dict(zip(["adam", "adamw", "sgd", "rmsprop", "adagrad"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, name in zip(axes.flat, names):
        for t in found[name].trials:
            if t.score > -math.inf and is_number(t.config.get("lr")):
                color = colors.get(t.config.get("optimizer"), "gray")
                kind = stop_kind(stop_reason(t, found[name]))
                if kind == DIVERGED:
                    style = {"marker": "x", "color": color}
                elif kind == COMPLETED:
                    style = {"marker": markers.get(t.config.get("activation"), "o"), "color": color}
                else:  # hollow: stopped before its planned epochs
                    style = {"marker": markers.get(t.config.get("activation"), "o"), "facecolors": "none", "edgecolors": color}
                ax.scatter(t.config["lr"], 100 * t.score, s=36, **style)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final val accuracy (%)")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=o) for o, c in colors.items()]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=a) for a, m in markers.items()]
    handles += [
        plt.Line2D([], [], color="k", marker="o", ls="", label="completed"),
        plt.Line2D([], [], color="k", marker="o", mfc="none", ls="", label="stopped early (ASHA, error, unfinished)"),
        plt.Line2D([], [], color="k", marker="x", ls="", label="diverged"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7)
    return save_grid(fig, axes, len(names), out / "accuracy_vs_lr.png", bottom=legend_h / fig.get_figheight())


def plot_accuracy_vs_compute(found, out: Path) -> tuple[Path, list[str]]:
    """Validation accuracy against the compute each trial held, per experiment, with the
    Pareto front drawn and the cheapest trial within NEAR_BEST_POINTS of the best ringed; and
    one line per experiment naming that trial."""
    import matplotlib.pyplot as plt

    rows_of = {name: trial_rows([exp]) for name, exp in found.items()}
    fronts = {name: (rows, pareto_front(rows)) for name, rows in rows_of.items()}
    names = [n for n, (_, f) in fronts.items() if f["front"]]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(max(7.5, 5 * cols), 3.6 * rows), squeeze=False)
    notes = []
    for ax, name in zip(axes.flat, names):
        trials, front = fronts[name]
        unit = front["unit"]
        points = [(r[unit], 100 * r["last_val_acc"]) for r in trials if is_number(r.get(unit)) and is_number(r.get("last_val_acc"))]
        ax.scatter(*zip(*points), s=24, color="tab:blue", alpha=0.6, label="trials")
        ax.step([r[unit] for r in front["front"]], [100 * r["last_val_acc"] for r in front["front"]], where="post", color="tab:red", label="Pareto front")
        cheap, best = front["cheapest_near_best"], front["best"]
        if cheap is not None:
            ax.scatter([cheap[unit]], [100 * cheap["last_val_acc"]], s=120, facecolors="none", edgecolors="k",
                       label=f"cheapest within {NEAR_BEST_POINTS:g} point of the best")  # fmt: skip
            share = f", {cheap[unit] / best[unit]:.0%} of the best's compute" if best is not cheap and best[unit] else " (the best itself)"
            notes.append(f"- {name}: {cheap['trial']} reaches {100 * cheap['last_val_acc']:.2f}% val accuracy "
                         f"(best {100 * best['last_val_acc']:.2f}%) with {cheap[unit]:.0f} {COMPUTE_UNITS[unit]}{share}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"{COMPUTE_UNITS[unit]} held")
        ax.set_ylabel("final val accuracy (%)")
        ax.legend(fontsize=7)
    return save_grid(fig, axes, len(names), out / "accuracy_vs_compute.png"), notes


def finetune_vs_extract_bars(found: dict[str, ExperimentResult]) -> dict[str, dict[str, tuple[float | None, float | None]]]:
    """``{"cifar10-alexnet": {"finetune": (ours, reference), "feature_extract": (...)}}`` in
    %: our best trial's test accuracy and the seed's, for every fine-tune and feature-extract
    experiment that ran or has a reference; ``None`` where there is none."""
    bars: dict[str, dict] = {}
    for name in dict.fromkeys([*(EXPERIMENTS if seed_ran(found) else []), *found]):
        exp, declared = found.get(name), EXPERIMENTS.get(name)
        mode = exp.record.mode if exp else declared.mode
        if exp is not None and best_per_model_mode(exp):
            continue  # its backbones and modes get bars of their own, below
        reference = exp.record.reference_accuracy if exp else declared.reference_accuracy  # None on another dataset
        reference = reference if is_number(reference) else None
        if mode not in TRANSFER_MODES or (exp is None and reference is None):
            continue
        best = exp.best() if exp else None
        ours = 100 * best["test_acc"] if best and "test_acc" in best else None
        bars.setdefault(name.removesuffix(f"-{mode}"), {})[mode] = (ours, reference)
    for exp in found.values():  # experiments searching the model and/or mode: per backbone, within the sweep
        for row in best_per_model_mode(exp):
            if row["mode"] in TRANSFER_MODES:
                bars.setdefault(f"{row['model']}\n({exp.name}, val)", {})[row["mode"]] = (row["val_acc"], None)
    return bars


def plot_finetune_vs_extract(found, out: Path) -> Path | None:
    """``None`` where no experiment fine-tuned or feature-extracted, nor has a reference that did."""
    import matplotlib.pyplot as plt

    bars = finetune_vs_extract_bars(found)
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(bars)), 4))
    width = 0.2
    colors = dict(zip(TRANSFER_MODES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for g, modes in enumerate(bars.values()):
        for i, (mode, what) in enumerate([(m, w) for m in TRANSFER_MODES for w in ("ours", "reference")]):
            value = modes.get(mode, (None, None))[what == "reference"]
            x = g + (i - 1.5) * width
            if value is None:
                ax.text(x, 1, "no result" if what == "ours" else "no ref.", rotation=90, ha="center", va="bottom", fontsize=7)
                continue
            ax.bar(x, value, width, color=colors[mode], alpha=1 if what == "ours" else 0.45, hatch="//" if what == "reference" else None)
            ax.text(x, value + 1, f"{value:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(bars)), list(bars), fontsize=8)
    ax.set_ylim(0, 110)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fine-tuning vs feature extraction: our best trial (solid) beside the reference (hatched)", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[m], alpha=a, hatch=h, label=f"{m.replace('_', ' ')} ({w})")
               for m in TRANSFER_MODES for w, a, h in (("ours", 1, None), ("reference", 0.45, "//"))]  # fmt: skip
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = out / "finetune_vs_feature_extraction.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# Where each trial's curve ends, by how it ended (see tltune.results.stop_reason).
END_MARKERS = {
    COMPLETED: {"marker": "o", "color": "tab:green"},
    ASHA_STOP: {"marker": "X", "color": "tab:red", "s": 70},
    DIVERGED: {"marker": "v", "color": "black"},
    ERROR: {"marker": "s", "color": "tab:gray"},
    INTERRUPTED: {"marker": ">", "color": "tab:orange"},
}


def plot_intermediate_values(exp: ExperimentResult, out: Path) -> Path | None:
    """Validation accuracy per epoch of every trial (the values ASHA compares), each curve's
    end marked by how the trial ended, an ASHA stop with its epoch; ``None`` without results."""
    import matplotlib.pyplot as plt

    trials = [t for t in exp.trials if t.epochs]
    if not trials:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    kinds = set()
    for t in trials:
        points = [(row["training_iteration"], 100 * acc) for row in t.epochs if (acc := val_acc_of(row)) is not None]
        if points:
            ax.plot(*zip(*points), lw=1, alpha=0.6)
        kind = stop_kind(stop_reason(t, exp))
        kinds.add(kind)
        end = points[-1] if points and kind != DIVERGED else (t.epochs_run, 0)
        ax.scatter(*end, zorder=3, **END_MARKERS[kind])
        if kind == ASHA_STOP:
            ax.annotate(f"ASHA @ {t.epochs_run}", end, xytext=(4, 4), textcoords="offset points", fontsize=7, color="tab:red")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(f"{exp.name}: every trial's val accuracy per epoch", fontsize=9)
    handles = [plt.Line2D([], [], ls="", marker=m["marker"], color=m["color"], label=k) for k, m in END_MARKERS.items() if k in kinds]
    ax.legend(handles=handles, fontsize=7)
    fig.tight_layout()
    path = out / f"{safe_name(exp.name)}-intermediate_values.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_best_over_time(exp: ExperimentResult, out: Path) -> Path | None:
    """The best validation accuracy against the sweep's time (also as ``<exp>-best_over_time.csv``)."""
    import matplotlib.pyplot as plt

    curve = best_over_time(exp)
    if not curve:
        return None
    write_trials_csv([{"minutes": m, "best_val_acc": acc} for m, acc in curve], out / f"{safe_name(exp.name)}-best_over_time.csv")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    minutes, accs = zip(*curve)
    ax.step(minutes, [100 * a for a in accs], where="post", marker="o", ms=3)
    end = search_wall_s(exp)
    if end is not None and end / 60 > minutes[-1]:  # the plateau up to the search's last trial end
        ax.plot([minutes[-1], end / 60], [100 * accs[-1]] * 2, color=ax.lines[0].get_color())
        ax.axvline(end / 60, color="gray", lw=0.8, ls=":")
        ax.annotate("search ends", (end / 60, 100 * accs[0]), xytext=(-4, 0), textcoords="offset points", ha="right", fontsize=7, color="gray")
    ax.set_xlabel("minutes since the first trial started")
    ax.set_ylabel("best val accuracy so far (%)")
    ax.set_title(f"{exp.name}: best validation accuracy against sweep time", fontsize=9)
    fig.tight_layout()
    path = out / f"{safe_name(exp.name)}-best_over_time.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@contextlib.contextmanager
def open_study(exp: ExperimentResult) -> Iterator[optuna.Study | None]:
    """The experiment's Optuna study while the ``with`` lasts, read from a temporary copy of
    its journal (downloaded from cloud storage): Optuna's file backend may take lock files beside
    the file it opens, and the run is only read. ``None`` where there is no journal (no
    search space, or a run from before studies were kept), or, after a warning, where it
    cannot be read."""
    import optuna

    path = storage.join(exp.path, OPTUNA_JOURNAL)
    if not storage.is_file(path):
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="tltune-study-") as tmp:
        try:
            local = storage.download(path, tmp) if storage.is_uri(path) else shutil.copy(path, tmp)
            journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(local)))
            study = optuna.load_study(study_name=exp.name, storage=journal)
            study.get_trials(deepcopy=False)  # replays the whole journal: damage shows here
        except Exception as exc:  # a damaged journal can fail anywhere in Optuna's replay of it
            warn_skip(path, exc)
            study = None
        yield study


def plot_study(study, name: str, out: Path) -> list[str]:
    """Optuna's plots of ``study`` into ``out``: a markdown image for each, or a note why not."""
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [p for p in dict.fromkeys(k for t in completed for k in t.params) if len({repr(t.params.get(p)) for t in completed}) > 1]
    plots = {
        "optimization_history": (optuna_plots.plot_optimization_history, {}),
        "parallel_coordinate": (optuna_plots.plot_parallel_coordinate, {}),
        # PED-ANOVA needs no scikit-learn (Optuna's default, fANOVA, does)
        "param_importances": (optuna_plots.plot_param_importances, {"evaluator": PedAnovaImportanceEvaluator()}),
    }
    lines = []
    for kind, (draw, options) in plots.items():
        path = out / f"{safe_name(name)}-{kind}.png"
        if not completed:
            why_not = "no completed trial in the study"
        elif kind == "param_importances" and (len(completed) < 2 or not varying):
            why_not = "needs 2 completed trials and a hyperparameter that varies"
        else:
            why_not = _save_optuna_plot(draw, study, options, path, f"{name}: ")
        title = kind.replace("_", " ")
        lines.append(f"![{name}: {title}]({path.name})" if why_not is None else f"_{title}: skipped ({why_not})_")
    return lines


def _save_optuna_plot(draw, study, options: dict, path: Path, title_prefix: str) -> str | None:
    """``draw(study, **options)`` saved to ``path``; the reason if Optuna could not draw it."""
    import matplotlib
    import matplotlib.pyplot as plt

    # rc_context: Optuna switches the style to ggplot for good; the warnings are about its API
    # being experimental, or degenerate axes of few trials
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ax = draw(study, **options)
        except Exception as exc:  # Optuna refuses some studies (e.g. importances of constant values)
            plt.close("all")
            return " ".join(str(exc).split())[:200] or type(exc).__name__
        ax.set_title(f"{title_prefix}{ax.get_title()}")
        fig = ax.get_figure()
        fig.savefig(path, dpi=90, bbox_inches="tight")
        plt.close(fig)
    return None


def experiment_section(exp: ExperimentResult, out: Path) -> list[str]:
    """The report's markdown parts for one experiment: how its trials ended, its top trials,
    its learning curves and its Optuna study's plots."""
    kinds = Counter(stop_kind(stop_reason(t, exp)) for t in exp.trials)
    ended = ", ".join(f"{kinds[kind]} {kind}" for kind in END_MARKERS if kinds[kind])
    parts = [f"### {exp.name}", f"{len(exp.trials)} trial(s)" + (f": {ended}" if ended else ""), top_trials(exp)]
    curves = plot_intermediate_values(exp, out)
    if curves is not None:
        parts.append(f"![{exp.name}: val accuracy per epoch]({curves.name})")
    over_time = plot_best_over_time(exp, out)
    if over_time is not None:
        parts.append(f"![{exp.name}: best val accuracy against sweep time]({over_time.name}) ([csv]({over_time.stem}.csv))")
    with open_study(exp) as study:
        if study is not None:
            parts.append("\n\n".join(plot_study(study, exp.name, out)))
    return parts


def write_report(paths: list[str | Path], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    runs = collect_runs(paths)
    found = latest(runs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: pass --out a folder for report.md and its plots")
    try:
        return _write(paths, runs, found, out)
    except OSError as exc:
        reason = exc.strerror or " ".join(str(exc).split())
        raise UserError(f"cannot write the report to {out}: {reason}") from None


def _write(paths: list[str | Path], runs: dict[str, dict[str, ExperimentResult]], found: dict[str, ExperimentResult], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    compute_plot, cheapest = plot_accuracy_vs_compute(found, out)
    plots = [plot_learning_curves(found, out), plot_accuracy_vs_lr(found, out), plot_finetune_vs_extract(found, out), compute_plot]
    plots = [p for p in plots if p is not None]
    write_trials_csv(trial_rows(list(found.values())), out / TRIALS_CSV)
    write_trials_csv(repeat_rows(list(found.values())), out / REPEATS_CSV)
    write_trials_csv(experiment_rows(list(found.values())), out / EXPERIMENTS_CSV)
    parts = [
        "# tltune results",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from {', '.join(f'`{p}`' for p in paths)}. "
        "Ours = test accuracy of the experiment's best trial, chosen on the validation split; at the reference "
        "settings = the seed's own settings, trained to the end. With repeats: mean ± std over seeds; the best − ours at the reference settings "
        "is beyond the spread when it exceeds the sum of both standard deviations. The best's seed 0 is the trial "
        "that won the search on validation accuracy, so its mean leans high by that selection; its re-trained seeds do not.",
        "## Against the reference",
        reference_table(found),
        transfer_gain(found),
        model_mode_text(list(found.values())),
        "## Accuracy per compute\nThe cheapest configuration within "
        f"{NEAR_BEST_POINTS:g} point of each experiment's best (compute: the seconds a trial ran times the GPUs, or else the CPUs, "
        f"it held; `tltune best RUN --pareto` prints each front):\n" + ("\n".join(cheapest) or "no trial reported its compute")
        + f"\n\n![accuracy against compute]({compute_plot.name})",
        f"Every trial with its configuration, epochs run, stop reason, accuracies and wall time: [{TRIALS_CSV}]({TRIALS_CSV}); "
        f"the reference and the best configuration per seed: [{REPEATS_CSV}]({REPEATS_CSV}); "
        f"per experiment, what it spent and its accuracies over seeds: [{EXPERIMENTS_CSV}]({EXPERIMENTS_CSV}).",
        *(runs_side_by_side(runs, out) if len(runs) > 1 else []),
        *(["## Assumptions", assumptions_table()] if seed_ran(found) else []),  # the seed's gaps, as we filled them
        "## Per experiment: top trials (by final validation accuracy), learning curves, Optuna study",
    ]
    for exp in found.values():
        parts += experiment_section(exp, out)
    parts += ["## Plots", *(f"![{p.stem}]({p.name})" for p in plots)]
    report = out / "report.md"
    report.write_text("\n\n".join(part for part in parts if part) + "\n")
    return report
