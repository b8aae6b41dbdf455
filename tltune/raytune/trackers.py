"""Every trial of a sweep as one run in MLflow and/or W&B (``--log-to``)."""

from __future__ import annotations


def tracker_callbacks(log_to: tuple[str, ...] | None, experiment: str, exp_dir: str, group: str) -> list:
    """Tune callbacks logging each trial of ``experiment`` (``group``: the search, or its repeats)."""
    return []


def record_outcome(log_to: tuple[str, ...] | None, experiment: str, exp_dir: str, summary: dict) -> None:
    """After an experiment: the tested trials' test accuracy, and its best trial marked."""
