"""Sweep spec files (tltune.specs): the format, its one-line errors, the built-in experiments
as spec files, and ``tltune sweep SPEC.yaml`` / ``tltune spec NAME``."""

import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from tltune import command, specs
from tltune.errors import UserError
from tltune.experiments import EXPERIMENTS, FAMILIES, Choice, IntRange, LogUniform, Uniform
from tltune.specs import builtin_spec_path, load_spec, load_spec_file

SNAPSHOT = ROOT / "tests" / "data" / "builtin_experiments.json"  # the Python-declared experiments, before the YAML

PETS = """\
experiments:
  - name: pets-backbones
    dataset: mypets
    model: {choice: [resnet18, mobilenet_v3_small, alexnet]}
    mode: {choice: [finetune, feature_extract]}
    weights: imagenet
    reference: {optimizer: sgd, lr: 0.001, epochs: 5}
    space:
      optimizer: {choice: [sgd, adam]}
      lr: {loguniform: [1.0e-5, 1.0e-2]}
      epochs: {int: [1, 10]}
      dropout: {uniform: [0.0, 0.5]}
    num_samples: 20
"""


def dumped(experiment) -> dict:
    fields = {f.name: getattr(experiment, f.name) for f in dataclasses.fields(experiment)}
    return json.loads(json.dumps({**fields, "space": {k: repr(v) for k, v in experiment.space.items()}}))


def test_the_yaml_built_ins_equal_the_python_declared_ones_field_by_field():
    snapshot = json.loads(SNAPSHOT.read_text())
    assert list(EXPERIMENTS) == [e["name"] for e in snapshot["experiments"]]
    for expected, experiment in zip(snapshot["experiments"], EXPERIMENTS.values()):
        got = dumped(experiment)
        assert list(got) == list(expected)
        for key, value in expected.items():
            assert got[key] == value, (experiment.name, key)
            if isinstance(value, dict):
                assert list(got[key].items()) == list(value.items()), (experiment.name, key, "order")
    assert list(FAMILIES.items()) == list(snapshot["families"].items())
    assert all(e.spec_file is None for e in EXPERIMENTS.values())


def test_built_ins_load_fast_and_once():
    specs.builtin_specs.cache_clear()
    specs.builtin_experiments.cache_clear()
    started = time.perf_counter()
    experiments, _ = specs.builtin_experiments()
    assert time.perf_counter() - started < 0.25  # about 10 ms with libyaml
    assert specs.builtin_experiments()[0] is experiments
    assert experiments == EXPERIMENTS


def test_the_format_of_the_issue(tmp_path):
    path = tmp_path / "pets.yaml"
    path.write_text(PETS)
    [e] = load_spec(path)
    assert (e.name, e.dataset, e.model, e.mode, e.num_samples, e.weights) == ("pets-backbones", "mypets", "resnet18", "finetune", 20, "imagenet")
    assert e.models() == ("resnet18", "mobilenet_v3_small", "alexnet") and e.modes() == ("finetune", "feature_extract")
    assert e.space == {
        "optimizer": Choice(("sgd", "adam")), "lr": LogUniform(1e-5, 1e-2), "epochs": IntRange(1, 10), "dropout": Uniform(0.0, 0.5),
        "model": Choice(("resnet18", "mobilenet_v3_small", "alexnet")), "mode": Choice(("finetune", "feature_extract")),
    }  # fmt: skip
    assert e.reference == {"optimizer": "sgd", "lr": 0.001, "epochs": 5, "dropout": 0.25, "model": "resnet18", "mode": "finetune"}
    assert e.label == "model × mode search" and e.reference_accuracy is None and e.spec_file == str(path)
    assert load_spec(str(path)) == load_spec_file(path) == [e]
    assert load_spec(PETS)[0] == dataclasses.replace(e, spec_file=None), "text as well as a file"


def test_defaults_fixed_values_and_the_other_keys(tmp_path):
    path = tmp_path / "more.yaml"
    path.write_text("""\
experiments:
  - name: source
    dataset: mnist
    model: cnn
    channels: 3
    image_size: 32
    space:
      lr: {loguniform: [1e-4, 1e-2]}     # 1e-4 without a dot is a number too
      epochs: {int: [2, 7]}
      width: {choice: [2, 1]}
      depth: 3
  - name: target
    dataset: svhn
    model: cnn
    mode: finetune
    source: source
    reference_accuracy: 91.5
    batch_size: 32
    grace_period: 2
    repeats: 3
    weights: {cnn: source.pt}
    reference: {model: cnn}
    label: transfer
    description: free text, ignored
""")
    source, target = load_spec(path)
    assert source.mode == "scratch" and source.label == "cnn scratch" and source.input == {"channels": 3, "image_size": 32}
    assert source.reference == {"depth": 3, "lr": pytest.approx(1e-3), "epochs": 4, "width": 2, "optimizer": "adam"}
    assert "depth" not in source.space and source.space["lr"] == LogUniform(1e-4, 1e-2)
    assert target.reference == {"optimizer": "adam", "lr": 0.001, "epochs": 5}, "the seed's CNN reference; the plain model not repeated"
    assert (target.source, target.reference_accuracy, target.batch_size, target.grace_period, target.repeats) == ("source", 91.5, 32, 2, 3)
    assert target.weights == {"cnn": str(tmp_path / "source.pt")} and target.label == "transfer" and target.num_samples == 1


def test_a_searched_model_takes_the_reference_s_model_and_a_default_label(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("experiments:\n  - {name: m, dataset: cifar10, model: {choice: [resnet18, alexnet]}, mode: feature_extract, reference: {model: alexnet}}\n")
    [e] = load_spec(path)
    assert e.model == "alexnet" and e.reference["model"] == "alexnet" and e.label == "model search, feature_extract"
    assert "mode" not in e.space and e.modes() == ("feature_extract",)


EXPERIMENT = "  - name: pets\n    dataset: mypets\n    model: resnet18\n"

# (spec text, the key path the error must name, words it must say)
BAD_SPECS = [
    (EXPERIMENT + "    num_sample: 5\n", "experiments[0].num_sample", "did you mean num_samples?"),
    (EXPERIMENT + "    num_samples: many\n", "experiments[0].num_samples", "expected a whole number >= 1, got 'many'"),
    (EXPERIMENT + "    num_samples: 0\n", "experiments[0].num_samples", "got 0"),
    (EXPERIMENT + "    num_samples: -3\n", "experiments[0].num_samples", "got -3"),
    (EXPERIMENT + "    space: {lr: {loguniform: ['0.001', '0.1']}}\n", "experiments[0].space.lr", "numbers without quotes, got '0.001'"),
    (EXPERIMENT + "    space: {optimizer: {choice: []}}\n", "experiments[0].space.optimizer", "no options"),
    (EXPERIMENT + "    space: {lr: {loguniform: [0.1, 0.01]}}\n", "experiments[0].space.lr", "low < high, got [0.1, 0.01]"),
    (EXPERIMENT + "    space: {dropout: {uniform: [0.5, 0.5]}}\n", "experiments[0].space.dropout", "low < high"),
    (EXPERIMENT + "    space: {lr: {loguniform: [0, 0.1]}}\n", "experiments[0].space.lr", "low > 0"),
    (EXPERIMENT + "    space: {epochs: {int: [1.5, 10]}}\n", "experiments[0].space.epochs", "whole numbers, got 1.5"),
    (EXPERIMENT + "    space: {lr: {logunif: [1.0e-5, 0.1]}}\n", "experiments[0].space.lr", "unknown domain 'logunif' (did you mean loguniform?"),
    (EXPERIMENT + "    mode: finetunes\n", "experiments[0].mode", "unknown mode 'finetunes' (did you mean finetune?"),
    (EXPERIMENT + "    mode: {choice: [finetune, frozen]}\n", "experiments[0].mode", "unknown mode 'frozen'"),
    (EXPERIMENT + "    space: {optimizer: {choice: [sgd, lbfgs]}}\n", "experiments[0].space.optimizer", "unknown optimizer 'lbfgs'"),
    (EXPERIMENT + "    reference: {activation: swish}\n", "experiments[0].reference.activation", "unknown activation 'swish'"),
    (EXPERIMENT + "    reference: {lr: -1}\n", "experiments[0].reference.lr", "learning rate must be > 0"),
    (EXPERIMENT + "    reference: {lr: '0.001'}\n", "experiments[0].reference.lr", "learning rate must be > 0, got '0.001'"),
    (EXPERIMENT + "    reference: {lr: 0.5}\n    space: {lr: {loguniform: [1.0e-5, 0.01]}}\n", "experiments[0].reference.lr", "outside the space searched (loguniform [1e-05, 0.01])"),
    (EXPERIMENT + "    reference: {optimizer: adamw}\n    space: {optimizer: {choice: [sgd, adam]}}\n", "experiments[0].reference.optimizer", "outside the space"),
    (EXPERIMENT + "    reference: {epochs: ten}\n    space: {epochs: {int: [1, 10]}}\n", "experiments[0].reference.epochs", "whole number >= 1, got 'ten'"),
    (EXPERIMENT + "    reference: {model: alexnet}\n", "experiments[0].reference.model", "not searched"),
    (EXPERIMENT + "    space: {model: {choice: [alexnet]}}\n", "experiments[0].space.model", "the experiment's own 'model: {choice"),
    ("experiments:\n  - dataset: mypets\n    model: resnet18\n", "experiments[0]", "missing 'name'"),
    ("experiments:\n  - name: pets\n    model: resnet18\n", "experiments[0]", "missing 'dataset'"),
    ("experiments:\n  - name: pets\n    dataset: mypets\n", "experiments[0]", "missing 'model'"),
    ("experiments:\n  - name: pets\n    dataset: mypets\n    model: ''\n", "experiments[0].model", "expected a name"),
    ("experiments:\n  - name: a/b\n    dataset: mypets\n    model: resnet18\n", "experiments[0].name", "the experiment's folder"),
    (EXPERIMENT + EXPERIMENT, "experiments[1].name", "'pets' names an earlier experiment too"),
    (EXPERIMENT + "    source: petz\n", "experiments[0].source", "did you mean pets?"),
    (EXPERIMENT + "    reference_accuracy: 120\n", "experiments[0].reference_accuracy", "0 to 100"),
    (EXPERIMENT + "    weights: {resnet50: imagenet}\n", "experiments[0].weights.resnet50", "did you mean resnet18?"),
    (EXPERIMENT + "    space: {lr: {loguniform: [1.0e-5, 0.1], int: [1, 2]}}\n", "experiments[0].space.lr", "a domain is one of"),
    (EXPERIMENT + "    space: {width: {choice: [1, 1]}}\n", "experiments[0].space.width", "lists 1 twice"),
    (EXPERIMENT + "    space: {depth: 2}\n    reference: {depth: 3}\n", "experiments[0].space.depth", "fixed at 2, but the reference says 3"),
    ("experiments:\n" + EXPERIMENT + "families:\n  pet: [pets, cats]\n", "families.pet", "unknown experiment 'cats'"),
    ("experiment:\n" + EXPERIMENT, "experiment", "did you mean experiments?"),
    ("experiments: []\n", "experiments", "an empty list"),
    ("experiments:\n" + EXPERIMENT + "    lr: 0.1\n    lr: 0.2\n", "line 6", "key 'lr' given twice"),
]


@pytest.mark.parametrize("text, key, words", BAD_SPECS, ids=[f"{i}-{key}" for i, (_, key, _) in enumerate(BAD_SPECS)])
def test_a_bad_spec_is_one_line_naming_the_file_and_the_key(tmp_path, text, key, words):
    path = tmp_path / "pets.yaml"
    path.write_text(text if text.startswith(("experiments", "experiment:")) else "experiments:\n" + text)
    with pytest.raises(UserError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}"), message
    assert words in message and "\n" not in message, message


@pytest.mark.parametrize("text, words", [
    ("- just\n- a list\n", "expected a mapping with an 'experiments' list at the top, got a list"),
    ("", "got nothing"),
    ("families: {}\n", "a mapping without it"),
    ("experiments:\n  - name: pets\n    dataset: [mypets\n", "line 4: did not find expected ',' or ']', while parsing a flow sequence at line 3"),
])  # fmt: skip
def test_a_spec_that_is_not_one_is_named_with_its_file(tmp_path, text, words):
    path = tmp_path / "pets.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_spec(path)
    assert str(caught.value).startswith(f"{path}: ") and words in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_a_yaml_syntax_error_gives_its_line(tmp_path):
    path = tmp_path / "pets.yaml"
    path.write_text("experiments:\n  - name: pets\n    dataset: mypets\n    model: {choice: [a, b}\n")
    with pytest.raises(UserError, match=rf"^{path}: line 4: .*not valid YAML"):
        load_spec(path)


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"nope.yaml: cannot read the spec file"):
        load_spec(tmp_path / "nope.yaml")


def test_plain_values_and_a_source_among_the_built_ins(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("experiments:\n  - {name: t, dataset: svhn, model: cnn, mode: finetune, source: mnist_to_svhn-source}\n")
    assert load_spec(path)[0].source == "mnist_to_svhn-source"
    assert math.isclose(specs.default_value(LogUniform(1e-5, 1e-1)), 1e-3)


def test_paths_in_a_spec_are_taken_from_its_folder(tmp_path, monkeypatch):
    """A dataset folder and a weights file named relative to the spec are found beside it, from
    any folder (as its factories are); names stay names; one only the current folder has is
    taken from there; an absolute path or ~ is kept."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    for folder in (project / "data" / "pets" / "train", project / "dogs" / "train", elsewhere / "old"):
        folder.mkdir(parents=True)
    (project / "r18.pt").write_bytes(b"")
    spec = project / "sweep.yaml"
    spec.write_text(
        "experiments:\n"
        "  - {name: a, dataset: ./data/pets, model: resnet18, weights: r18.pt}\n"
        "  - {name: b, dataset: dogs, model: {choice: [resnet18, alexnet]}, weights: {resnet18: ../project/r18.pt, alexnet: IMAGENET1K_V1}}\n"
        "  - {name: c, dataset: cats, model: alexnet, weights: imagenet}\n"
        "  - {name: d, dataset: old, model: resnet18, weights: none}\n"
        f"  - {{name: e, dataset: mnist, model: resnet18, weights: {tmp_path}/w.pt}}\n"
        "  - {name: f, dataset: ~/pets, model: resnet18, weights: missing.pt}\n"
    )  # fmt: skip
    monkeypatch.chdir(elsewhere)
    a, b, c, d, e, f = load_spec_file("../project/sweep.yaml")
    assert (a.dataset, a.weights) == (str(project / "data" / "pets"), str(project / "r18.pt"))
    assert (b.dataset, b.weights) == (str(project / "dogs"), {"resnet18": str(project / "r18.pt"), "alexnet": "IMAGENET1K_V1"})
    assert (c.dataset, c.weights) == ("cats", "imagenet"), "a name under the data root"
    assert (d.dataset, d.weights) == ("old", "none"), "a folder of the current folder only, as before"
    assert (e.dataset, e.weights) == ("mnist", f"{tmp_path}/w.pt")
    assert f.dataset == str(Path("~/pets").expanduser()) and f.weights == str(project / "missing.pt"), "an error names the file beside the spec"
    assert load_spec(PETS)[0].dataset == "mypets", "spec text has no folder: names and paths as given"


# The command line


def test_tltune_spec_prints_a_file_that_reloads_to_the_same_experiments(capsys):
    assert command.main(["spec", "cifar10"]) == 0
    text = capsys.readouterr().out
    assert text == (ROOT / "tltune" / "specs" / "cifar10.yaml").read_text()
    assert load_spec(text) == [EXPERIMENTS[name] for name in FAMILIES["cifar10"]]
    for family in specs.BUILTIN_SPECS:
        assert command.main(["spec", family]) == 0
        assert [e.name for e in load_spec(capsys.readouterr().out)] == FAMILIES[family]


def test_tltune_spec_of_an_experiment_is_its_file_and_alone_lists_them(capsys):
    assert command.main(["spec", "mnist_to_svhn-scratch"]) == 0
    assert capsys.readouterr().out == builtin_spec_path("mnist_to_svhn").read_text()
    assert command.main(["spec"]) == 0
    listing = capsys.readouterr().out
    assert all(family in listing for family in specs.BUILTIN_SPECS) and "cifar10-cnn-search-plus" in listing
    assert command.main(["spec", "cifar100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown spec 'cifar100': did you mean cifar10?") and err.count("\n") == 1


def test_tltune_sweep_passes_a_spec_file_s_experiments(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(command.cli, "main", lambda experiments, description, argv, **kw: calls.append((experiments, description, argv, kw)) or 0)
    path = tmp_path / "pets.yaml"
    path.write_text(PETS)
    assert command.main(["sweep", str(path), "mnist", "--quick"]) == 0
    [(experiments, description, argv, kw)] = calls
    assert experiments[0] == load_spec(path)[0] and experiments[1:] == FAMILIES["mnist"]
    assert str(path) in description and "pets-backbones" in description and argv == ["--quick"] and not kw["run_all"]


def test_tltune_sweep_of_a_bad_spec_is_one_line_and_exit_2(tmp_path, capsys):
    path = tmp_path / "pets.yaml"
    path.write_text("experiments:\n" + EXPERIMENT + "    num_sample: 5\n")
    assert command.main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: experiments[0].num_sample: unknown key (did you mean num_samples? use {', '.join(specs.EXPERIMENT_KEYS)})\n"
    assert command.main(["sweep", str(tmp_path / "missing.yml")]) == 2
    assert "missing.yml: cannot read the spec file" in capsys.readouterr().err
    assert command.main(["sweep", "cifar11"]) == 2
    assert "unknown family or experiment 'cifar11': did you mean cifar10? use one of" in capsys.readouterr().err


def test_the_same_name_from_two_targets_is_refused(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("experiments:\n  - {name: mnist-cnn, dataset: mnist, model: cnn}\n")
    assert command.main(["sweep", "mnist", str(path)]) == 2
    assert "experiment 'mnist-cnn' is declared by an earlier target too" in capsys.readouterr().err


def test_spec_and_list_import_neither_torch_nor_ray():
    code = ("import sys\nfrom tltune.command import main\ncodes = [main(['spec', 'cifar10']), main(['spec']), main(['list'])]\n"
            "print(codes, [m for m in ('ray', 'torch', 'torchvision') if m in sys.modules])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[0, 0, 0] []", out.stdout


def test_the_spec_files_are_package_data():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"tltune.specs" = ["*.yaml"]' in pyproject
    assert sorted(p.stem for p in (ROOT / "tltune" / "specs").glob("*.yaml")) == sorted(specs.BUILTIN_SPECS)


def test_a_factory_is_looked_up_again_for_each_sweep_of_the_process(tmp_path, monkeypatch):
    """tltune.run twice in one process (a notebook): the second spec's ``model.py`` is its own,
    not the first's, and an edited file is read as it is now, as the trials' workers read it."""
    from tltune.models import load_factory
    from tltune.plan import choose_experiments, factory_modules

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    specs = {}
    for name, width in (("a", 3), ("b", 5)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.py").write_text(f"def build(num_classes):\n    return {width}\n")
        specs[name] = folder / "spec.yaml"
        specs[name].write_text(f"experiments:\n  - {{name: {name}, dataset: mnist, model: 'model:build', mode: scratch}}\n")
    try:
        for name, width in (("a", 3), ("b", 5), ("a", 3)):
            chosen = choose_experiments(load_spec_file(specs[name]), None)
            assert load_factory("model:build")(10) == width and factory_modules(chosen) == (str(tmp_path / name / "model.py"),)
        (tmp_path / "a" / "model.py").write_text("def build(num_classes):\n    return 77\n")  # another size: a .pyc of the same second is not reused
        choose_experiments(load_spec_file(specs["a"]), None)
        assert load_factory("model:build")(10) == 77, "the file as it is now"
    finally:
        sys.modules.pop("model", None)
