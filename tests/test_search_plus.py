"""The extended search beyond the seed (issue #12): on-batch augmentation, learning-rate
schedules, width/depth/BatchNorm, label smoothing and weight decay, the experiment that
searches them, and that none of it changes the seed's experiments."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ray import tune

from test_search_space import sampled, settings
from tltune.cli import main
from tltune.config import ModelSpec, TrialConfig
from tltune.data import BatchTransform
from tltune.errors import UserError
from tltune.experiments import EXPERIMENTS, FAMILIES, check_settings
from tltune.models import build_model
from tltune.raytune.sweep import to_tune_domain, trial_config
from tltune.results import SUMMARY_FILE
from tltune.studies import distribution
from tltune.train import (
    AUGMENTATIONS,
    CROP_PADDING,
    OPTIMIZERS,
    LRSchedule,
    augment,
    build_optimizer,
    load_checkpoint,
    load_checkpoint_config,
    save_checkpoint,
    seed_everything,
    setup_image_model,
    train_one_epoch,
)

PLUS = "cifar10-cnn-search-plus"
NEW_KEYS = ("width", "depth", "batch_norm", "weight_decay", "augmentation", "label_smoothing", "schedule")


def uint8_images(n, size=8, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ augmentation


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_augmentations_keep_shape_and_type_and_repeat_with_the_seed(name):
    images = uint8_images(16)
    first = augment(name, images, torch.Generator().manual_seed(3))
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert torch.equal(first, augment(name, images, torch.Generator().manual_seed(3))), "same seed, same batch"
    if name != "none":
        assert not torch.equal(first, augment(name, images, torch.Generator().manual_seed(4)))


def test_no_augmentation_draws_no_random_numbers():
    """So the seed's experiments shuffle exactly as before augmentation existed."""
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    images = uint8_images(4)
    assert augment("none", images, generator) is images
    assert torch.equal(generator.get_state(), state)


def test_flip_mirrors_some_images_left_right_and_keeps_the_others():
    images = uint8_images(64)
    flipped = augment("flip", images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(out, image.flip(1)) for out, image in zip(flipped, images)]
    kept = [torch.equal(out, image) for out, image in zip(flipped, images)]
    assert all(m or k for m, k in zip(mirrored, kept)) and any(mirrored) and any(kept)


def test_crop_is_a_window_of_the_black_padded_image():
    images = uint8_images(32)
    generator = torch.Generator().manual_seed(1)
    flipped = augment("flip", images, torch.Generator().manual_seed(1))
    cropped = augment("flip_crop", images, generator)
    p, size = CROP_PADDING, images.shape[1]
    offsets = set()
    for out, image in zip(cropped, flipped):
        padded = F.pad(image, (0, 0, p, p, p, p))
        found = [(r, c) for r in range(2 * p + 1) for c in range(2 * p + 1) if torch.equal(padded[r : r + size, c : c + size], out)]
        assert found, "every crop is a window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 5, "the offsets vary from image to image"


def test_the_training_loop_draws_an_epochs_augmentation_once_and_slices_it_per_batch(monkeypatch):
    """No per-batch draw or host-to-device copy (each would make the host wait for a GPU):
    every batch's step receives its slice of parameters drawn for the whole epoch."""
    import tltune.train as train

    draws, applied = [], []

    def counting(draw):
        def wrapped(n, generator):
            draws.append(n)
            return draw(n, generator)

        return wrapped

    def recording(apply):
        def wrapped(images, params):
            applied.append((len(images), len(params), params.device))
            return apply(images, params)

        return wrapped

    steps = tuple((counting(draw), recording(apply)) for draw, apply in AUGMENTATIONS["flip_crop"])
    monkeypatch.setitem(train.AUGMENTATIONS, "flip_crop", steps)
    model = build_model("cnn", "scratch", num_classes=10, in_channels=3, image_size=8)
    images, labels = uint8_images(100), torch.randint(0, 10, (100,))
    transform = BatchTransform(3, 8, (0.5,) * 3, (0.25,) * 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train.train_one_epoch(model, optimizer, images, labels, transform, 32, torch.Generator().manual_seed(0), augmentation="flip_crop")
    assert draws == [100, 100], "one draw per step for the epoch's 100 images, none per batch"
    assert [(n, m) for n, m, _ in applied] == [(32, 32)] * 6 + [(4, 4)] * 2, "each batch, each step: its own slice"
    assert all(device == images.device for _, _, device in applied)


# ---------------------------------------------------------------------- lr schedules


def rates(schedule: LRSchedule) -> list[float]:
    return [schedule.rate(epoch, step) for epoch in range(1, schedule.epochs + 1) for step in range(schedule.steps_per_epoch)]


def test_schedule_values_over_the_trials_epochs():
    constant, cosine, one_cycle = (LRSchedule(name, 0.1, 4, 10) for name in ("constant", "cosine", "onecycle"))
    assert rates(constant) == [0.1] * 40
    assert cosine.rate(1, 0) == pytest.approx(0.1) and cosine.rate(3, 0) == pytest.approx(0.05), "halfway: half"
    assert all(a >= b for a, b in zip(rates(cosine), rates(cosine)[1:])) and 0 < rates(cosine)[-1] < 1e-3
    cycle = rates(one_cycle)
    assert cycle[0] == pytest.approx(0.1 / 25) and max(cycle) == pytest.approx(0.1) and cycle.index(max(cycle)) == 12  # 30% of 40 steps
    assert cycle[:12] == sorted(cycle[:12]) and cycle[12:] == sorted(cycle[12:], reverse=True) and cycle[-1] < 1e-3
    trial = TrialConfig("cifar10", "cnn", "scratch", "sgd", 0.2, epochs=5, batch_size=64, seed=0, schedule="cosine")
    assert LRSchedule.of(trial, 1000) == LRSchedule("cosine", 0.2, 5, 16), "batches per epoch, the last one short"


def tiny_training(epochs, resume_after=None, tmp_path=None):
    """The trainable's loop on toy data with every new setting on; with ``resume_after`` it
    checkpoints there and goes on in a fresh model and optimizer, as a resumed trial does."""
    config = TrialConfig("toy", "cnn", "scratch", "sgd", 0.05, epochs, 8, seed=3, width=2, depth=3, batch_norm=True,
                         weight_decay=1e-3, augmentation="flip_crop", label_smoothing=0.1, schedule="onecycle")  # fmt: skip
    images, labels = uint8_images(40), torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    transform = BatchTransform(3, 8, (0.5,) * 3, (0.25,) * 3)

    def fresh(seed):
        torch.manual_seed(seed)
        model = build_model("cnn", "scratch", 3, 3, 8, "relu", None, config.width, config.depth, config.batch_norm)
        return model, build_optimizer(config.optimizer, model, config.lr, config.weight_decay)

    model, optimizer = fresh(0)
    schedule, seen = LRSchedule.of(config, len(labels)), []
    for epoch in range(1, epochs + 1):
        if epoch - 1 == resume_after:
            save_checkpoint(tmp_path, model, optimizer, epoch - 1, config)
            model, optimizer = fresh(99)
            assert load_checkpoint(tmp_path, model, optimizer) == resume_after
        generator = seed_everything(config.seed * 1000 + epoch)
        train_one_epoch(model, optimizer, images, labels, transform, config.batch_size, generator, None,
                        config.augmentation, config.label_smoothing, schedule, epoch)  # fmt: skip
        seen.append(optimizer.param_groups[0]["lr"])
    return model, seen


def test_a_resumed_trial_continues_schedule_and_augmentation_exactly(tmp_path):
    straight, straight_lrs = tiny_training(3)
    resumed, resumed_lrs = tiny_training(3, resume_after=2, tmp_path=tmp_path)
    assert resumed_lrs == straight_lrs and straight_lrs[-1] < straight_lrs[0], "the schedule picks up at its step"
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


# ------------------------------------------------------------------ model and losses


def seeds_cnn(in_channels, image_size, activation="relu") -> nn.Sequential:
    """The vanilla CNN as the seed's rows have always built it."""
    act = nn.ReLU if activation == "relu" else nn.Tanh
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, 128), act(),
    )  # fmt: skip


@pytest.mark.parametrize("activation, channels, size", [("relu", 3, 32), ("tanh", 1, 28)])
def test_the_default_cnn_is_the_seeds_cnn_with_the_same_initial_weights(activation, channels, size):
    torch.manual_seed(0)
    expected_head, expected = nn.Linear(128, 10), seeds_cnn(channels, size, activation)
    torch.manual_seed(0)
    model = build_model("cnn", "scratch", 10, channels, size, activation)
    assert str(model.backbone) == str(expected)
    state = {**{f"backbone.{k}": v for k, v in expected.state_dict().items()}, **{f"head.{k}": v for k, v in expected_head.state_dict().items()}}
    assert list(model.state_dict()) == list(state) and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("width, depth, batch_norm", [(1, 2, False), (2, 2, False), (2, 3, True), (4, 3, False)])
def test_width_multiplies_every_conv_and_the_hidden_layer(width, depth, batch_norm):
    model = build_model("cnn", "scratch", 10, 3, 32, "relu", None, width, depth, batch_norm)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32 * width * 2**i for i in range(depth)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (depth if batch_norm else 0)
    assert model.head.in_features == 128 * width and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(UserError, match="vanishes"):
        build_model("cnn", "scratch", 10, 3, 4, depth=3)


def test_a_trial_configs_architecture_reaches_the_model():
    splits = type("S", (), {"channels": 3, "image_size": 32, "num_classes": 10, "mean": (0.5,) * 3, "std": (0.25,) * 3})()
    model, _ = setup_image_model(ModelSpec("cnn", "gelu", None, None, width=2, depth=3, batch_norm=True), "scratch", splits, None)
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256]
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) and isinstance(model.backbone[2], nn.GELU)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothing_is_the_training_loss(smoothing):
    torch.manual_seed(0)
    model = build_model("cnn", "scratch", 3, 3, 8)
    images, labels = uint8_images(24), torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(2))
    transform = BatchTransform(3, 8, (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        expected = F.cross_entropy(model(transform(images)), labels, label_smoothing=smoothing).item()
    frozen = build_optimizer("sgd", model, 0.0)  # lr 0: the model the loss is computed on stays as it is
    stats = train_one_epoch(model, frozen, images, labels, transform, 8, seed_everything(0), label_smoothing=smoothing)
    assert stats.loss == pytest.approx(expected, rel=1e-5)


def test_weight_decay_reaches_every_optimizer():
    model = build_model("cnn", "scratch", 2, 1, 8)
    for name, (_, extras) in OPTIMIZERS.items():
        assert build_optimizer(name, model, 0.01, 3e-4).param_groups[0]["weight_decay"] == 3e-4
        assert build_optimizer(name, model, 0.01).param_groups[0]["weight_decay"] == extras.get("weight_decay", 0), "None: the table's"


# -------------------------------------------------------------------------- configs


def test_configs_of_older_runs_take_the_seeds_training():
    old = sampled(trial_config(*settings())[0])  # cifar10-cnn-search: none of the new keys
    assert not set(NEW_KEYS) & set(old)
    trial = TrialConfig.from_dict(old)
    assert (trial.width, trial.depth, trial.batch_norm, trial.weight_decay) == (1, 2, False, None)
    assert (trial.augmentation, trial.label_smoothing, trial.schedule) == ("none", 0.0, "constant")
    assert trial.model_spec == ModelSpec(trial.model, trial.activation, trial.image_size, trial.channels)
    assert TrialConfig.from_dict(trial.to_dict()) == trial and {k: trial.to_dict()[k] for k in old} == old


def test_checkpoints_of_older_configs_load(tmp_path):
    old = {"dataset": "toy", "model": "cnn", "mode": "scratch", "optimizer": "adam", "lr": 1e-3, "epochs": 2, "batch_size": 8, "seed": 0}
    model = build_model("cnn", "scratch", 2, 3, 8)
    optimizer = build_optimizer("adam", model, 1e-3)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "config": old}, tmp_path / "model.pt")
    assert load_checkpoint_config(tmp_path) == TrialConfig.from_dict(old)


def old_trial_config(experiment, s) -> dict:
    """Tune's param_space as tltune built it before the extended search."""
    return {
        **{k: v for k, v in s.reference.items() if k not in s.space},
        **{k: to_tune_domain(v) for k, v in s.space.items()},
        "dataset": s.dataset, "model": experiment.model, "mode": experiment.mode, "batch_size": s.batch_size, "seed": s.seed,
        "image_size": s.image_size, "channels": s.channels, "cached_features": s.cached_features,
    }  # fmt: skip


def described(value):
    if isinstance(value, tune.search.sample.Domain):
        return type(value).__name__, getattr(value, "categories", None), getattr(value, "lower", None), getattr(value, "upper", None), type(value.get_sampler()).__name__, vars(value.get_sampler())
    return value


@pytest.mark.parametrize("name", [n for n in EXPERIMENTS if n != PLUS])
def test_the_seeds_experiments_param_space_is_unchanged(name):
    experiment, s = settings(name)
    param_space, _ = trial_config(experiment, s)
    old = old_trial_config(experiment, s)
    assert list(param_space) == list(old), "same keys, same order (Optuna samples in this order)"
    assert {k: described(v) for k, v in param_space.items()} == {k: described(v) for k, v in old.items()}
    assert not set(NEW_KEYS) & set(param_space) and set(s.space) <= {"optimizer", "activation", "lr", "epochs"}


# ------------------------------------------------------------------ the experiment


def test_the_extended_search_is_its_own_family_and_starts_from_its_reference():
    assert PLUS not in FAMILIES["cifar10"] and FAMILIES["cifar10_plus"] == [PLUS] and PLUS not in FAMILIES["all"], "all: the seed's rows"
    experiment, s = settings(PLUS)
    param_space, points = trial_config(experiment, s)
    assert points[0] == {k: experiment.reference[k] for k in experiment.space}
    assert isinstance(param_space["batch_size"], tune.search.sample.Domain), "searched, not overridden by --batch-size"
    assert (param_space["depth"], param_space["batch_norm"]) == (3, True), "fixed for every trial"
    assert max(s.space["epochs"].high, experiment.reference["epochs"]) <= 10
    for _ in range(20):
        config = sampled(param_space)
        assert {k: TrialConfig.from_dict(config).to_dict()[k] for k in config} == config
    for key, domain in experiment.space.items():
        dist = distribution(domain)
        assert dist._contains(dist.to_internal_repr(experiment.reference[key])), f"Optuna's study holds the reference's {key}"


def test_new_settings_are_checked():
    for bad, message in [({"augmentation": "mixup"}, "unknown augmentation"), ({"schedule": "step"}, "unknown schedule"),
                         ({"depth": 4}, "depth must be"), ({"width": 0}, "width must be"),
                         ({"label_smoothing": 1.0}, "label_smoothing"), ({"weight_decay": -1.0}, "weight_decay")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            check_settings(bad, where="test")
    check_settings(dict(EXPERIMENTS[PLUS].reference), where="test")


@pytest.mark.slow  # a real sweep of its own
def test_a_tiny_real_sweep_of_the_extended_search(tmp_path, real_data_root, capsys):
    argv = [
        "--quick", "--num-samples", "2", "--max-concurrent-trials", "1", "--train-subset", "500", "--test-subset", "200", "--max-epochs", "1",
        "--data-root", str(real_data_root), "--storage-path", str(tmp_path), "--name", "plus",
    ]  # fmt: skip
    assert main(FAMILIES["cifar10_plus"], "sweeps/cifar10_plus.py", argv) == 0, capsys.readouterr().err[-3000:]  # in this process
    exp_dir = tmp_path / "plus" / PLUS
    summary = json.loads((exp_dir / SUMMARY_FILE).read_text())
    assert summary["trials"] == 2 and "test_acc" in summary["reference_trial"]
    trials = [d for d in exp_dir.iterdir() if (d / "params.json").is_file()]
    reference = {**EXPERIMENTS[PLUS].reference, "epochs": 1}
    configs = [json.loads((d / "params.json").read_text()) for d in trials]
    assert any(all(c[k] == v for k, v in reference.items()) for c in configs), "the reference ran"
    for trial, config in zip(trials, configs):
        checkpoint = torch.load(next(trial.glob("checkpoint_*/model.pt")), weights_only=True)
        assert checkpoint["optimizer"]["param_groups"][0]["weight_decay"] == pytest.approx(config["weight_decay"])
        assert TrialConfig.from_dict(checkpoint["config"]) == TrialConfig.from_dict(config) and config["depth"] == 3


def test_the_input_check_before_ray_builds_the_reference_network_with_its_width_depth_and_batch_norm():
    """Three pooling steps need an 8-pixel input: the search-plus reference is refused at 4
    pixels before Ray starts, where the seed's two-block CNN is fine."""
    from test_trial_failures import tiny_splits
    from tltune.plan import check_model_input

    experiment, plus = settings(PLUS, image_size=4)
    assert plus.reference_model_spec("cnn") == ModelSpec("cnn", "relu", 4, None, width=2, depth=3, batch_norm=True)
    with pytest.raises(UserError, match="3 pooling steps"):
        check_model_input(experiment, plus, tiny_splits())
    seed_experiment, seed = settings("mnist-cnn", image_size=4)
    assert seed.reference_model_spec("cnn") == ModelSpec("cnn", "relu", 4, None)
    check_model_input(seed_experiment, seed, tiny_splits())


def test_a_frozen_backbone_is_computed_once_only_when_every_trial_would_get_the_same_output():
    from tltune.plan import backbone_output_is_fixed
    from tltune.experiments import Choice

    reference = {"optimizer": "sgd", "lr": 1e-3}
    assert backbone_output_is_fixed(reference, {"lr": None})
    for shape in ("activation", "width", "depth", "batch_norm", "augmentation"):
        assert not backbone_output_is_fixed(reference, {shape: Choice((1, 2))}), shape
    assert not backbone_output_is_fixed({**reference, "augmentation": "flip"}, {})
    assert backbone_output_is_fixed({**reference, "augmentation": "none"}, {})


def test_the_feature_cache_key_changes_with_every_field_of_the_model_spec():
    from dataclasses import replace

    from test_trial_failures import tiny_splits
    from tltune.features import feature_key

    splits, spec = tiny_splits(), ModelSpec("cnn", image_size=8)
    keys = {feature_key(splits, None, s) for s in (spec, replace(spec, width=2), replace(spec, depth=3), replace(spec, batch_norm=True), replace(spec, activation="elu"))}
    assert len(keys) == 5
