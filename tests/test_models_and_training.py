from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision

from tltune.config import TrialConfig
from tltune.data import ImageArrays, Splits, as_tensors
from tltune.errors import UserError
from tltune.models import ACTIVATIONS, build_model, input_spec, load_imagenet_state
from tltune.train import (
    OPTIMIZERS,
    DivergedError,
    Runtime,
    build_optimizer,
    evaluate,
    load_checkpoint,
    load_checkpoint_config,
    optimizer_extras,
    save_checkpoint,
    seed_everything,
    setup_model,
    train_one_epoch,
)

TOY = TrialConfig(dataset="toy", model="cnn", mode="scratch", optimizer="adam", lr=1e-3, epochs=3, batch_size=32, seed=0)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_vanilla_cnn_shapes(activation, channels, size):
    model = build_model("cnn", "scratch", 10, channels, size, activation)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 10)
    assert any(isinstance(m, ACTIVATIONS[activation]) for m in model.modules())


def test_alexnet_modes_freeze_and_keep_backbone_in_eval():
    state = torchvision.models.alexnet().state_dict()
    extract = build_model("alexnet", "feature_extract", 10, 3, 64, pretrained_state=state)
    trainable = [n for n, p in extract.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    extract.train()
    assert not extract.backbone.training and extract.head.training, "Dropout in the frozen backbone stays off"
    assert torch.equal(extract.backbone[0][0].weight, state["features.0.weight"])
    finetune = build_model("alexnet", "finetune", 10, 3, 64, pretrained_state=state)
    assert all(p.requires_grad for p in finetune.parameters())
    assert finetune(torch.zeros(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(UserError, match="unknown mode"):
        build_model("cnn", "distill", 10, 3, 32)
    with pytest.raises(UserError, match="unknown model"):
        build_model("resnet", "scratch", 10, 3, 32)


def test_alexnet_local_weights_file(tmp_path):
    reference = torchvision.models.alexnet()
    path = tmp_path / "alexnet.pth"
    torch.save(reference.state_dict(), path)
    state = load_imagenet_state(str(path))
    model = build_model("alexnet", "feature_extract", 10, 3, 224, pretrained_state=state)
    assert torch.equal(model.backbone[-2].weight, reference.classifier[4].weight)


def test_bad_weights_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_imagenet_state(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), wrong)
    with pytest.raises(UserError, match="do not fit torchvision's AlexNet"):
        load_imagenet_state(str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read weights file"):
        load_imagenet_state(str(garbage))


def test_input_spec_rejects_tiny_alexnet_input():
    with pytest.raises(UserError, match="at least 63"):
        input_spec("alexnet", 3, 32, None, 32, (0.5,) * 3, (0.5,) * 3)
    assert input_spec("alexnet", 1, 28, None, None, (0.1,), (0.3,))[:2] == (3, 224)
    assert input_spec("cnn", 1, 28, 3, 32, (0.1,), (0.3,))[:2] == (3, 32)


def _separable_splits(n=256, size=8):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, n)
    images = (rng.integers(0, 60, (n, size, size, 1)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    arrays = ImageArrays(images, labels.astype(np.int64))
    return Splits("toy", ["a", "b"], arrays, arrays, arrays, (0.3,), (0.3,))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_optimizer_learns_a_separable_problem(optimizer):
    splits = _separable_splits()
    model, transform = setup_model(TOY, splits, None)
    opt = build_optimizer(optimizer, model, 0.01 if optimizer in ("sgd", "adagrad") else 0.001)
    x, y = as_tensors(splits.train)
    for epoch in range(3):
        stats = train_one_epoch(model, opt, x, y, transform, 32, seed_everything(epoch))
    assert evaluate(model, x, y, transform).accuracy > 0.9, stats


def test_diverging_loss_raises():
    splits = _separable_splits()
    model, transform = setup_model(TOY, splits, None)
    opt = build_optimizer("sgd", model, 1e12)
    x, y = as_tensors(splits.train)
    with pytest.raises(DivergedError):
        for _ in range(3):
            train_one_epoch(model, opt, x, y, transform, 32)


class OverflowOnce(torch.nn.Module):
    """A linear model whose output is infinite for the batch holding image ``at``: what an
    fp16 forward pass does when an activation overflows."""

    def __init__(self, features: int, at: int):
        super().__init__()
        self.linear, self.at = torch.nn.Linear(features, 2), at

    def forward(self, x):
        out = self.linear(x.flatten(1))
        return out * float("inf") if (x.flatten(1)[:, 0] == self.at).any() else out


def overflow_epoch(scaled: bool):
    x = torch.randn(128, 4)
    x[:, 0] = 0.0
    x[70, 0] = 1.0  # one of four batches of 32 overflows
    y = (x[:, 1] > 0).long()
    model = OverflowOnce(4, at=1)
    runtime = Runtime("cpu")
    runtime.scaler = torch.amp.GradScaler("cpu", enabled=scaled)  # the fp16 runtime's scaler; fp16 itself needs a GPU
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, lambda b: b, 32, seed_everything(0), runtime)
    return stats, before, model


def test_one_overflowed_fp16_batch_is_a_skipped_step_not_a_divergence():
    stats, before, model = overflow_epoch(scaled=True)
    assert stats.skipped_steps == 1 and np.isfinite(stats.loss), stats
    assert all(torch.isfinite(p).all() for p in model.parameters()), "GradScaler skipped the overflowed batch's step"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the other batches trained"


def test_a_non_finite_loss_without_loss_scaling_is_a_divergence():
    with pytest.raises(DivergedError, match="of 4 batches"):
        overflow_epoch(scaled=False)


def test_training_is_seeded():
    splits = _separable_splits()
    results = []
    for _ in range(2):
        seed_everything(7)
        model, transform = setup_model(replace(TOY, activation="tanh"), splits, None)
        opt = build_optimizer("adam", model, 1e-3)
        x, y = as_tensors(splits.train)
        results.append(train_one_epoch(model, opt, x, y, transform, 32, seed_everything(7)).loss)
    assert results[0] == results[1]


def test_checkpoint_round_trip_leaves_out_frozen_weights(tmp_path):
    state = torchvision.models.alexnet().state_dict()
    model = build_model("alexnet", "feature_extract", 10, 3, 64, pretrained_state=state)
    opt = build_optimizer("sgd", model, 0.1)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    config = replace(TOY, model="alexnet", mode="feature_extract", optimizer="sgd", lr=0.1, image_size=64)
    save_checkpoint(tmp_path, model, opt, 3, config)
    assert (tmp_path / "model.pt").stat().st_size < 1_000_000, "only the head is saved"
    assert load_checkpoint_config(tmp_path) == config
    restored = build_model("alexnet", "feature_extract", 10, 3, 64, pretrained_state=state)
    restored_opt = build_optimizer("sgd", restored, 0.1)
    assert load_checkpoint(tmp_path, restored, restored_opt) == 3
    assert torch.equal(restored.head.weight, model.head.weight)
    assert restored_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(tmp_path, build_model("cnn", "scratch", 10, 3, 32))


def test_cnn_transfer_keeps_the_source_backbone_and_a_new_head():
    source = build_model("cnn", "scratch", 10, 3, 32, "elu")
    target = build_model("cnn", "feature_extract", 10, 3, 32, "elu", pretrained_state=source.state_dict())
    assert torch.equal(target.backbone[0].weight, source.backbone[0].weight)
    assert not torch.equal(target.head.weight, source.head.weight)
    assert [n for n, p in target.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    with pytest.raises(UserError, match="does not fit"):
        build_model("cnn", "finetune", 10, 1, 28, "elu", pretrained_state=source.state_dict())


def test_checkpoints_carry_their_config_in_plain_types(tmp_path):
    """Tune's samplers can give NumPy scalars; the checkpoint still loads with weights_only."""
    model = build_model("cnn", "scratch", 2, 1, 8)
    opt = build_optimizer("adam", model, 1e-3)
    config = replace(TOY, lr=np.float64(3e-4), epochs=np.int64(4), seed=np.int64(7), precision="bf16")
    save_checkpoint(tmp_path, model, opt, 1, config)
    stored = torch.load(tmp_path / "model.pt", weights_only=True)["config"]
    assert stored == {**TOY.to_dict(), "lr": 3e-4, "epochs": 4, "seed": 7, "precision": "bf16"}
    assert type(stored["lr"]) is float and type(stored["epochs"]) is int
    assert load_checkpoint_config(tmp_path) == config


def test_checkpoints_from_before_configs_still_load(tmp_path):
    model = build_model("cnn", "scratch", 2, 1, 8)
    opt = build_optimizer("adam", model, 1e-3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}, tmp_path / "model.pt")
    assert load_checkpoint_config(tmp_path) is None
    assert load_checkpoint(tmp_path, build_model("cnn", "scratch", 2, 1, 8), opt) == 2


def test_optimizer_extras_are_what_the_optimizers_are_built_with():
    model = build_model("cnn", "scratch", 2, 1, 8)
    assert optimizer_extras("sgd") == {"momentum": 0.9} and optimizer_extras("adamw") == {"weight_decay": 0.01}
    for name in OPTIMIZERS:
        group = build_optimizer(name, model, 0.05).param_groups[0]
        assert group["lr"] == 0.05 and all(group[k] == v for k, v in optimizer_extras(name).items())
    optimizer_extras("sgd")["momentum"] = 0.0
    assert optimizer_extras("sgd") == {"momentum": 0.9}, "a copy: the table stays as declared"
