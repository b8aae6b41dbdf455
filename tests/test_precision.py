"""Mixed precision, channels_last, torch.compile and their flags, on the CPU (bench/gpu.py --smoke: tests/test_first_gpu_run.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import ray
import torch

from tltune import train
from tltune.cli import main
from tltune.options import parse
from tltune.plan import check_device_options, experiment_settings
from tltune.config import TrialConfig
from tltune.data import BatchTransform, FeatureTransform, ImageArrays, Splits, as_tensors
from tltune.errors import UserError
from tltune.experiments import EXPERIMENTS
from tltune.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from tltune.raytune.sweep import experiment_record, trial_config
from tltune.raytune.trainable import trial_runtime
from tltune.train import (
    PRECISIONS,
    Runtime,
    build_optimizer,
    evaluate,
    load_checkpoint,
    resolve_precision,
    save_checkpoint,
    seed_everything,
    setup_model,
    train_one_epoch,
)

CPU = torch.device("cpu")
TOY = TrialConfig(dataset="toy", model="cnn", mode="scratch", optimizer="adam", lr=1e-3, epochs=3, batch_size=32, seed=0)


def separable_splits(n=256, size=8):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = (rng.integers(0, 60, (n, size, size, 1)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    arrays = ImageArrays(images, labels.astype(np.int64))
    return Splits("toy", ["a", "b"], arrays, arrays, arrays, (0.3,), (0.3,))


def train_toy(runtime: Runtime, epochs=3, optimizer="adam"):
    splits = separable_splits()
    seed_everything(0)
    model, transform = setup_model(TOY, splits, None)
    runtime.prepare(model, transform)
    opt = build_optimizer(optimizer, model, 1e-3 if optimizer == "adam" else 1e-2)
    x, y = as_tensors(splits.train)
    losses = [train_one_epoch(model, opt, x, y, transform, 32, seed_everything(e), runtime).loss for e in range(epochs)]
    return model, opt, losses, evaluate(model, x, y, transform, runtime=runtime)


# ---------------------------------------------------------------------------- precision


def test_precision_table_and_auto():
    assert PRECISIONS == {"fp32": (None, False), "bf16": (torch.bfloat16, False), "fp16": (torch.float16, True)}
    for name in PRECISIONS:
        assert resolve_precision(name, CPU) == name
    assert resolve_precision("auto", CPU) == ("bf16" if train.cpu_has_bf16() else "fp32")


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_hardware(native, monkeypatch):
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: native)
    monkeypatch.setattr(train, "gpu_has_bf16", lambda device=None: native)
    assert resolve_precision("auto", CPU) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", torch.device("cuda")) == ("bf16" if native else "fp16")  # fp16 + GradScaler on older GPUs


def test_bf16_autocast_training_on_cpu_learns_with_finite_loss():
    runtime = Runtime(CPU, "bf16", channels_last=True)
    assert runtime.dtype == torch.bfloat16 and not runtime.scaler.is_enabled()
    model, _, losses, stats = train_toy(runtime)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] and stats.accuracy > 0.9
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast: the weights stay fp32"
    with runtime.autocast():
        assert model(torch.zeros(2, 1, 8, 8)).dtype == torch.bfloat16


def test_fp16_trains_with_loss_scaling_and_its_scale_is_checkpointed(tmp_path):
    runtime = Runtime(CPU, "fp16")
    assert runtime.scaler.is_enabled()
    model, opt, losses, stats = train_toy(runtime)
    assert all(np.isfinite(losses)) and stats.accuracy > 0.9
    runtime.scaler.update(1024.0)
    save_checkpoint(tmp_path, model, opt, 3, TOY, runtime.scaler)
    restored = Runtime(CPU, "fp16")
    assert load_checkpoint(tmp_path, model, opt, restored.scaler) == 3 and restored.scaler.get_scale() == 1024.0
    save_checkpoint(tmp_path, model, opt, 3, TOY, Runtime(CPU, "fp32").scaler)
    assert "scaler" not in torch.load(tmp_path / "model.pt", weights_only=True), "no scale to keep without fp16"


def test_fp32_runtime_is_the_old_default():
    """No runtime given: fp32, the model's device, layouts as before."""
    _, _, explicit, _ = train_toy(Runtime(CPU, "fp32"))
    splits = separable_splits()
    seed_everything(0)
    model, transform = setup_model(TOY, splits, None)
    opt = build_optimizer("adam", model, 1e-3)
    x, y = as_tensors(splits.train)
    default = [train_one_epoch(model, opt, x, y, transform, 32, seed_everything(e)).loss for e in range(3)]
    assert default == explicit


# ---------------------------------------------------------------------------- channels_last


@pytest.mark.parametrize("model_name, size", [("cnn", 32), ("alexnet", 64)])
def test_channels_last_gives_the_same_logits(model_name, size):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    outputs = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = build_model(model_name, "scratch", 10, 3, size).eval()
        transform = BatchTransform(3, size, IMAGENET_MEAN, IMAGENET_STD, memory_format=torch.contiguous_format)
        Runtime(CPU, "fp32", channels_last=channels_last).prepare(model, transform)
        x = transform(images)
        conv = model.backbone[0] if model_name == "cnn" else model.backbone[0][0]
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        with torch.no_grad():
            outputs.append(model(x))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4)


def test_channels_last_leaves_cached_features_alone():
    head, transform = build_model("cnn", "scratch", 10, 3, 8), FeatureTransform()
    Runtime(CPU, "bf16", channels_last=True).prepare(head, transform)
    assert head.backbone[0].weight.is_contiguous()  # untouched: its input is a (N, D) feature matrix


@pytest.mark.slow  # a minute of compiling on 2 CPU cores
def test_torch_compile_trains_and_keeps_state_dict_keys():
    eager_model, _, eager, _ = train_toy(Runtime(CPU, "fp32"), epochs=1, optimizer="sgd")
    model, _, compiled, _ = train_toy(Runtime(CPU, "fp32", compile=True), epochs=1, optimizer="sgd")
    assert model.state_dict().keys() == eager_model.state_dict().keys(), "checkpoints of both load into either"
    assert compiled == pytest.approx(eager, rel=1e-3)


# ---------------------------------------------------------------------------- settings and flags


def settings_for(argv, experiment="cifar10-cnn-search"):
    return EXPERIMENTS[experiment], experiment_settings(EXPERIMENTS[experiment], parse(argv))


@pytest.mark.parametrize("argv, precision, compiled", [([], "auto", False), (["--precision", "bf16", "--compile"], "bf16", True)])
def test_precision_reaches_every_trial_config_and_the_record(argv, precision, compiled):
    experiment, settings = settings_for(argv)
    param_space, points = trial_config(experiment, settings)
    assert param_space["precision"] == precision and param_space["compile"] is compiled
    assert all("precision" not in point for point in points), "fixed, never searched"
    record = json.loads(experiment_record(experiment, settings).to_json())
    assert record["settings"]["reference"]["precision"] == precision
    runtime = trial_runtime(TrialConfig.from_dict({**param_space, **points[0], "compile": False}), CPU)
    assert runtime.precision == resolve_precision(precision, CPU) and runtime.channels_last


def test_configs_from_before_the_flags_train_in_fp32():
    before_the_flags = {k: v for k, v in TOY.to_dict().items() if k not in ("precision", "compile")}
    runtime = trial_runtime(TrialConfig.from_dict(before_the_flags), CPU)
    assert runtime.precision == "fp32" and not runtime.compile


def run_cli(argv, capsys):
    code = main(["cifar10-cnn-search"], "test", argv)
    err = capsys.readouterr().err
    assert not ray.is_initialized()
    return code, err


@pytest.fixture
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_unknown_precision_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cifar10-cnn-search"], "test", ["--precision", "fp8"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_fp16_on_cpu_trials_is_one_error_line(tmp_path, capsys, monkeypatch, no_ray_address):
    """The command line's own code in this process (this machine has no GPU); the checks run
    before any data or Ray."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for extra, why in ((["--gpus-per-trial", "0"], "--gpus-per-trial 0"), ([], "no CUDA GPU is visible here")):
        code, err = run_cli(["--precision", "fp16", "--storage-path", str(tmp_path), *extra], capsys)
        assert code == 2, err
        assert err.strip().splitlines() == [f"error: --precision fp16 needs a GPU and these trials run on the CPU ({why}): use bf16, fp32 or auto"]
        assert list(tmp_path.iterdir()) == []


def fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")


def test_bf16_on_a_gpu_without_bf16_is_refused(monkeypatch, capsys, tmp_path, no_ray_address):
    fake_gpu(monkeypatch, (7, 0))
    code, err = run_cli(["--precision", "bf16", "--storage-path", str(tmp_path)], capsys)
    assert code == 2
    assert err == "error: --precision bf16: Tesla V100-SXM2-16GB (compute capability 7.0) has no native bf16 (needs 8.0+): use fp16 or auto\n"
    # fp16 is fine there, and so is bf16 on an Ampere GPU
    check_device_options(parse(["--precision", "fp16"]))
    fake_gpu(monkeypatch, (8, 0))
    check_device_options(parse(["--precision", "bf16"]))


def test_bf16_is_checked_again_on_the_trials_gpu(monkeypatch):
    """On a joined cluster the driver cannot see the trials' GPUs: the trial's runtime refuses
    bf16 on a GPU that only emulates it, with the same line."""
    from tltune.train import Runtime

    fake_gpu(monkeypatch, (7, 5))
    with pytest.raises(ValueError, match=r"^--precision bf16: Tesla V100-SXM2-16GB \(compute capability 7.5\) has no native bf16"):
        Runtime("cuda", "bf16")
    assert Runtime("cuda", "auto").precision == "fp16"
    fake_gpu(monkeypatch, (9, 0))
    assert Runtime("cuda", "bf16").precision == "bf16"


def test_a_joined_cluster_skips_the_local_gpu_checks(monkeypatch, no_ray_address):
    """The cluster's workers may have GPUs this machine lacks."""
    fake_gpu(monkeypatch, (7, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_device_options(parse(["--precision", "fp16", "--address", "10.0.0.1:6379"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    check_device_options(parse(["--precision", "bf16", "--address", "10.0.0.1:6379"]))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no local compile probe for a cluster"))
    check_device_options(parse(["--compile", "--address", "10.0.0.1:6379"]))
    # ...but --gpus-per-trial 0 says where trials run on any cluster
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        check_device_options(parse(["--precision", "fp16", "--gpus-per-trial", "0", "--address", "10.0.0.1:6379"]))


def test_the_compile_probe_runs_in_a_child_process(monkeypatch):
    """The driver holds no CUDA context or compile-worker pool for the whole sweep: the probe
    compiles in a child, on the device the trials will use."""
    from tltune.plan import COMPILE_PROBE, check_compile

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda argv, **k: calls.append(argv) or subprocess.CompletedProcess(argv, 0, "", ""))
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("nothing compiles in the driver"))
    check_compile("cuda")
    assert calls == [[sys.executable, "-c", COMPILE_PROBE, "cuda"]]
    monkeypatch.setattr(subprocess, "run", lambda argv, **k: subprocess.CompletedProcess(argv, 1, "InductorError: no Triton\n", ""))
    with pytest.raises(UserError, match=r"cannot run on this machine's cuda \(InductorError: no Triton\): drop --compile"):
        check_compile("cuda")


@pytest.mark.slow  # compiles in a child process
def test_compile_where_it_cannot_run_is_one_error_line(tmp_path, capsys, monkeypatch, no_ray_address):
    """No C++ compiler, as on a slim image: torch.compile's CPU backend cannot build kernels. The
    command line's own code in this process; the probe's child inherits the environment."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    results = tmp_path / "results"
    code, err = run_cli(["--compile", "--storage-path", str(results)], capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --compile: torch.compile cannot run on this machine's cpu"), err
    assert "drop --compile" in lines[0] and not results.exists()
