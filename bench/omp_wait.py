"""OpenMP's wait policy for torch's CPU threads: ``passive`` (a thread with no work left sleeps
at once) against libgomp's default (it spins for a while first, hoping for more work soon).
A sweep's processes share cores: trials beside the driver, Ray's daemons and whatever else the
machine runs. A spinning thread then burns a core that another process's thread is waiting
for, at every one of the many barriers of a training step. tltune's trials and its command
run torch with OMP_WAIT_POLICY=PASSIVE unless the environment sets a policy.

    python bench/omp_wait.py [--images 1536 --rounds 2]

Each round trains the small CNN through tltune's loop in fresh interpreters (OpenMP reads the
policy once, as torch loads it), with torch's default threads (one per core): alone, then as
``cores + 1`` processes at once (a shared machine); each policy in turn, the order alternating.
Prints wall and CPU seconds per policy, their ratios, and PASS when passive spends at least
1.5× less CPU where processes share the cores.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from common import parser, verdict

from tltune.openmp import WAIT_POLICY_ENV

POLICIES = ("default", "passive")


def child(images: int) -> None:
    from gpu import train_images_per_s

    import torch

    from tltune.train import resolve_precision

    cpu = torch.device("cpu")
    started, cpu_started = time.perf_counter(), time.process_time()
    train_images_per_s(cpu, "cnn", 32, 64, images, resolve_precision("auto", cpu), True)
    print(json.dumps({"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu_started, "threads": torch.get_num_threads()}))


def run_at_once(policy: str, processes: int, images: int) -> dict:
    """``processes`` children at once: their summed CPU seconds and the longest wall time."""
    env = {k: v for k, v in os.environ.items() if k != WAIT_POLICY_ENV}
    if policy == "passive":
        env[WAIT_POLICY_ENV] = "PASSIVE"
    argv = [sys.executable, __file__, "--child", "--images", str(images)]
    children = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) for _ in range(processes)]
    outputs = [c.communicate()[0] for c in children]
    if any(c.returncode for c in children):
        sys.exit(f"a training process failed (exit codes {[c.returncode for c in children]})")
    measured = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    return {"wall": max(m["wall"] for m in measured), "cpu": sum(m["cpu"] for m in measured), "threads": measured[0]["threads"]}


def main():
    p = parser(__doc__)
    p.add_argument("--images", type=int, default=1536, help="training images per process (batch 64, 32 px)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.images)
    cores = os.cpu_count() or 1
    crowds = {"alone": 1, f"{cores + 1} at once": cores + 1}
    totals = {(crowd, policy): {"wall": 0.0, "cpu": 0.0} for crowd in crowds for policy in POLICIES}
    for number in range(args.rounds):
        for crowd, processes in crowds.items():
            for policy in POLICIES if number % 2 == 0 else POLICIES[::-1]:
                measured = run_at_once(policy, processes, args.images)
                for key in ("wall", "cpu"):
                    totals[crowd, policy][key] += measured[key]
                print(f"round {number + 1}, {crowd}, {policy}: {measured['wall']:.1f} s wall, {measured['cpu']:.1f} CPU-s "
                      f"({measured['threads']} threads a process)", flush=True)  # fmt: skip
    print(f"{cores} cores, {args.images} images a process, summed over {args.rounds} rounds:")
    for crowd in crowds:
        default, passive = totals[crowd, "default"], totals[crowd, "passive"]
        print(f"  {crowd}: default {default['wall']:.1f} s, {default['cpu']:.1f} CPU-s; passive {passive['wall']:.1f} s, "
              f"{passive['cpu']:.1f} CPU-s; default / passive: wall {default['wall'] / passive['wall']:.2f}x, "
              f"CPU {default['cpu'] / passive['cpu']:.2f}x")  # fmt: skip
    shared = list(crowds)[-1]
    ok = verdict(f"CPU default / passive, {shared}", totals[shared, "default"]["cpu"] / totals[shared, "passive"]["cpu"], 1.5, unit="x")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
