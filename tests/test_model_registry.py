"""The model registry: torchvision models by name, user factories, and the built-in models
unchanged. CPU only, tiny inputs, nothing downloaded."""

import textwrap
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from tltune.errors import UserError
from tltune.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODELS,
    BackboneHead,
    build_model,
    check_model_name,
    input_spec,
    is_factory,
    load_factory,
    load_pretrained_state,
    model_kind,
    uses_imagenet_weights,
)

SIZE, CLASSES = 32, 10


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def _check_modes(name: str, params: dict | None = None) -> dict:
    """Build ``name`` in every mode; check output shape, what trains and the frozen backbone's mode."""
    models = {}
    for mode in ("scratch", "finetune", "feature_extract"):
        model = build_model(name, mode, CLASSES, 3, SIZE, params=params)
        assert isinstance(model, BackboneHead) and isinstance(model.head, nn.Linear)
        model.train()
        assert model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, CLASSES)
        if mode == "feature_extract":
            assert _trainable(model) == {"head.weight", "head.bias"}
            assert not any(m.training for m in model.backbone.modules()) and model.head.training
        else:
            assert _trainable(model) == {name for name, _ in model.named_parameters()}
            assert model.backbone.training
        models[mode] = model
    return models


@pytest.mark.parametrize("name, features", [("resnet18", 512), ("mobilenet_v3_small", 1024)])
def test_torchvision_models_in_every_mode(name, features):
    models = _check_modes(name)
    model = models["finetune"]
    assert model.head.in_features == features
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.backbone.modules()), "classifier replaced"
    assert "head.weight" in model.state_dict()


def test_torchvision_head_draws_the_cached_feature_heads_weights():
    torch.manual_seed(3)
    model = build_model("resnet18", "feature_extract", CLASSES, 3, SIZE)
    torch.manual_seed(3)
    alone = nn.Linear(512, CLASSES)
    assert torch.equal(model.head.weight, alone.weight) and torch.equal(model.head.bias, alone.bias)


def test_builtin_models_unchanged():
    assert MODELS == ("cnn", "alexnet")
    cnn = build_model("cnn", "scratch", CLASSES, 3, SIZE)
    assert list(cnn.state_dict()) == [
        "backbone.0.weight", "backbone.0.bias", "backbone.3.weight", "backbone.3.bias",
        "backbone.7.weight", "backbone.7.bias", "head.weight", "head.bias",
    ]  # fmt: skip
    alexnet = build_model("alexnet", "scratch", CLASSES, 3, 64)
    assert list(alexnet.state_dict())[:2] == ["backbone.0.0.weight", "backbone.0.0.bias"]
    assert list(alexnet.state_dict())[-4:] == ["backbone.7.weight", "backbone.7.bias", "head.weight", "head.bias"]
    torch.manual_seed(5)
    head_first = build_model("cnn", "scratch", CLASSES, 3, SIZE).head.weight
    torch.manual_seed(5)
    assert torch.equal(head_first, nn.Linear(128, CLASSES).weight), "the CNN's head is still created first"
    with pytest.raises(UserError, match="takes no parameters"):
        build_model("cnn", "scratch", CLASSES, 3, SIZE, params={"dropout": 0.1})


def test_model_kind_and_names():
    assert [model_kind(n) for n in ("cnn", "alexnet", "resnet18", "pkg.mod:fn")] == ["cnn", "alexnet", "torchvision", "factory"]
    assert is_factory("pkg.mod:fn") and not is_factory("resnet18")
    assert uses_imagenet_weights("alexnet") and uses_imagenet_weights("vit_b_16")
    assert not uses_imagenet_weights("cnn") and not uses_imagenet_weights("pkg.mod:fn")
    check_model_name("convnext_tiny")
    with pytest.raises(UserError, match=r"^exp: unknown model 'resnet19': did you mean resnet18\? \(cnn, alexnet, any torchvision") as err:
        check_model_name("resnet19", "exp")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="unknown model 'zzz': use cnn, alexnet"):
        model_kind("zzz")
    with pytest.raises(UserError, match="package.module:function"):
        model_kind("pkg mod:fn")


def test_input_spec_of_torchvision_models():
    assert input_spec("resnet18", 1, 28, None, None, (0.1,), (0.3,)) == (3, 224, IMAGENET_MEAN, IMAGENET_STD)
    assert input_spec("resnet18", 1, 28, None, 64, (0.1,), (0.3,))[:2] == (3, 64)
    assert input_spec("vit_b_16", 3, 32, None, None, (0.5,) * 3, (0.5,) * 3)[:2] == (3, 224)
    assert input_spec("inception_v3", 3, 32, None, None, (0.5,) * 3, (0.5,) * 3)[1] == 299
    assert input_spec("pkg.mod:fn", 1, 28, None, None, (0.1,), (0.3,)) == (1, 28, (0.1,), (0.3,))


def test_state_dict_file_round_trip(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)
    state = load_pretrained_state("resnet18", str(path))
    model = build_model("resnet18", "feature_extract", CLASSES, 3, SIZE, pretrained_state=state)
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)
    wrong = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), wrong)
    with pytest.raises(UserError, match="do not fit torchvision's resnet18") as err:
        load_pretrained_state("resnet18", str(wrong))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_state("resnet18", str(tmp_path / "missing.pth"))


def test_weights_names_and_offline_download(monkeypatch):
    with pytest.raises(UserError, match="not torchvision's for resnet18: use imagenet, one of IMAGENET1K_V1"):
        load_pretrained_state("resnet18", "IMAGENET1K_V2")
    with pytest.raises(UserError, match="not torchvision's for resnet18"):
        load_pretrained_state("resnet18", "ResNet50_Weights.IMAGENET1K_V2")

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    for weights in ("imagenet", "ResNet18_Weights.IMAGENET1K_V1"):
        with pytest.raises(UserError, match=r"could not download resnet18's .*weights: \{resnet18: FILE\}.*--weights FILE") as err:
            load_pretrained_state("resnet18", weights)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="state-dict file only"):
        load_pretrained_state("pkg.mod:fn", "imagenet")


FACTORIES = '''
from torch import nn
from tltune.models import BackboneHead

CALLS = []


def hidden(num_classes, dropout=0.0):
    CALLS.append(dropout)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 6), nn.Dropout(dropout), nn.Linear(6, num_classes),
    )


class Attributes(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(5, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def attributes(num_classes):
    return Attributes(num_classes)


def wrapped(num_classes):
    return BackboneHead(nn.Sequential(nn.Conv2d(3, 7, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(7, num_classes))


def broken(num_classes):
    raise ValueError("no such layer\\nsecond line")


def linearless(num_classes):
    return nn.Sequential(nn.Conv2d(3, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


not_callable = 3


def anything(num_classes, **params):
    return hidden(num_classes)
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "tlt_test_factories.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__("tlt_test_factories")
    yield module
    import sys

    sys.modules.pop("tlt_test_factories", None)


def test_factory_with_a_hidden_linear(factories):
    models = _check_modes("tlt_test_factories:hidden", {"dropout": 0.25})
    assert factories.CALLS == [0.25] * 3
    model = models["finetune"]
    assert model.head.in_features == 6
    assert any(isinstance(m, nn.Dropout) and m.p == 0.25 for m in model.backbone.modules())
    assert isinstance(model.backbone[-1], nn.Identity)
    torch.manual_seed(1)
    head = build_model("tlt_test_factories:hidden", "feature_extract", CLASSES, 3, SIZE).head
    torch.manual_seed(1)
    assert torch.equal(head.weight, nn.Linear(6, CLASSES).weight)


def test_factory_state_dict_file(factories, tmp_path):
    source = factories.hidden(3)  # another task's classes: the head's keys are left out
    path = tmp_path / "source.pth"
    torch.save(source.state_dict(), path)
    state = load_pretrained_state("tlt_test_factories:hidden", str(path))
    model = build_model("tlt_test_factories:hidden", "finetune", CLASSES, 3, SIZE, pretrained_state=state)
    assert torch.equal(model.backbone[0].weight, source[0].weight)
    with pytest.raises(UserError, match="does not fit the model of factory"):
        build_model("tlt_test_factories:attributes", "finetune", CLASSES, 3, SIZE, pretrained_state=state)


@pytest.mark.parametrize("function, features", [("attributes", 5), ("wrapped", 7)])
def test_factory_with_its_own_head(factories, function, features):
    models = _check_modes(f"tlt_test_factories:{function}")
    assert models["scratch"].head.in_features == features


def test_factory_errors(factories):
    with pytest.raises(UserError, match=r"^model factory tlt_test_factories:broken failed: ValueError: no such layer$"):
        build_model("tlt_test_factories:broken", "scratch", CLASSES, 3, SIZE)
    with pytest.raises(UserError, match="needs a last nn.Linear"):
        build_model("tlt_test_factories:linearless", "scratch", CLASSES, 3, SIZE)
    with pytest.raises(UserError, match="cannot import tlt_no_such_module"):
        check_model_name("tlt_no_such_module:build")
    with pytest.raises(UserError, match=r"^exp: model factory tlt_test_factories:missing: module tlt_test_factories has no missing$"):
        check_model_name("tlt_test_factories:missing", "exp")
    with pytest.raises(UserError, match="is not callable"):
        load_factory("tlt_test_factories:not_callable")
    assert load_factory("tlt_test_factories:hidden") is factories.hidden


def test_a_keyword_the_factory_does_not_take_is_refused_by_name(factories):
    """Before any data loads: the spec's keyword against the factory's signature."""
    from tltune.experiments import validate
    from tltune.specs import load_spec

    def spec(model: str, keyword: str) -> str:
        return (f"experiments:\n  - name: mine\n    dataset: cifar10\n    model: \"{model}\"\n    mode: scratch\n"
                f"    space:\n      {keyword}: {{uniform: [0.0, 0.5]}}\n")  # fmt: skip

    (mine,) = load_spec(spec("tlt_test_factories:hidden", "dropuot"))
    with pytest.raises(UserError, match=r"^experiment mine: dropuot is no keyword of the factory tlt_test_factories:hidden: "
                                        r"did you mean dropout\? it takes dropout$"):  # fmt: skip
        validate(mine)
    for model, keyword in (("tlt_test_factories:hidden", "dropout"), ("tlt_test_factories:anything", "whatever")):
        (fine,) = load_spec(spec(model, keyword))
        validate(fine)
