"""Shared bits of the benchmarks: data, and the PASS/FAIL line."""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-root", default=os.environ.get("TLTUNE_DATA_ROOT"), help="holds cifar10/ (default $TLTUNE_DATA_ROOT)")
    return p


def verdict(name: str, value: float, target: float, higher_is_better: bool = True, unit: str = "") -> bool:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3g}{unit} (target {sign} {target:g}{unit})")
    return ok
