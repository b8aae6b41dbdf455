"""--warm-start reads another run's params.json files: data, never trusted. A damaged one (a
string where a number belongs, not JSON at all) or one outside the space is skipped with a
warning, never a traceback or a failed experiment."""

import json
import shutil

from tltune.experiments import EXPERIMENTS, LogUniform
from tltune.plan import warm_start_points


def test_damaged_configurations_are_skipped_with_a_warning(mnist_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(mnist_run.run_dir / "mnist-cnn", run / "mnist-cnn", ignore=shutil.ignore_patterns("*.pt", "checkpoint_*"))
    (run / "runs.jsonl").write_text((mnist_run.run_dir / "runs.jsonl").read_text())
    space = dict(EXPERIMENTS["mnist-cnn"].space)
    good = warm_start_points(str(run), "mnist-cnn", space)
    assert good and all(set(space) <= set(c) for c in good)
    params = sorted((run / "mnist-cnn").glob("*/params.json"))
    configs = {p: json.loads(p.read_text()) for p in params}
    best = next(p for p, c in configs.items() if c == good[0])
    configs[best]["lr"] = "a lot"
    best.write_text(json.dumps(configs[best]))
    cut = next(p for p in params if p != best)
    cut.write_text('{"lr": ')  # cut short by a full disk
    capsys.readouterr()
    points = warm_start_points(str(run), "mnist-cnn", space)
    err = capsys.readouterr().err
    assert "skipping a configuration of mnist-cnn" in err and "its lr 'a lot' is not in the space searched" in err
    assert all(isinstance(c["lr"], float) for c in points)
    narrowed = warm_start_points(str(run), "mnist-cnn", {**space, "lr": LogUniform(0.5, 0.9)})
    assert narrowed == () and "is not in the space searched" in capsys.readouterr().err
