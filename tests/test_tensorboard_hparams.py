"""TensorBoard's HParams dashboard on a run directory, read through TensorBoard's own backend
(its event multiplexer, data provider and HParams plugin routes, as ``tensorboard --logdir``
serves them): one experiment summary at the run root, with every hyperparameter of every
experiment and its domain (on the session's shared MNIST run); every trial a session; throughput and learning rate as scalars."""

import json
from types import SimpleNamespace

import pytest
from google.protobuf import json_format
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.context import RequestContext
from tensorboard.data import provider as tb_provider
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, hparams_plugin
from tensorboard.plugins.hparams import metadata as hparams_metadata
from werkzeug.test import Client

from conftest import MNIST_RUN_EXPERIMENTS, MNIST_RUN_SAMPLES
from s3server import s3, s3_server  # noqa: F401  (fixtures)
from tltune import storage
from tltune.experiments import CNN_SEARCH_SPACE, Choice, IntRange, LogUniform
from tltune.raytune.callbacks import RUN_HPARAMS_SUFFIX, TensorBoardCallback, progress_line, read_run_hparams, write_run_hparams

EXPERIMENTS = MNIST_RUN_EXPERIMENTS  # the CNN searches activation, AlexNet has none
ALL_STATUSES = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING]


class TensorBoardBackend:
    """What ``tensorboard --logdir <logdir>`` serves the HParams dashboard from."""

    def __init__(self, logdir):
        multiplexer = EventMultiplexer()
        multiplexer.AddRunsFromDirectory(str(logdir))
        multiplexer.Reload()
        self.data = MultiplexerDataProvider(multiplexer, str(logdir))
        tb_context = base_plugin.TBContext(logdir=str(logdir), data_provider=self.data, multiplexer=multiplexer)
        self.plugin = hparams_plugin.HParamsPlugin(tb_context)
        self.hparams = backend_context.Context(tb_context)
        self.request = RequestContext()

    def post(self, route: str, request, response_type):
        """A request to one of the HParams plugin's HTTP routes, as the dashboard sends it."""
        reply = Client(self.plugin.get_plugin_apps()[route]).post("/", data=json_format.MessageToJson(request), content_type="application/json")
        assert reply.status_code == 200, reply.get_data(as_text=True)
        return json_format.Parse(reply.get_data(as_text=True), response_type())

    def experiment(self) -> api_pb2.Experiment:
        return self.post("/experiment", api_pb2.GetExperimentRequest(), api_pb2.Experiment)

    def runs_with_experiment_summary(self) -> list[str]:
        runs = self.hparams.hparams_metadata(self.request, experiment_id="")
        return sorted(run for run, tags in runs.items() if hparams_metadata.EXPERIMENT_TAG in tags)

    def session_groups(self, experiment: api_pb2.Experiment) -> list[api_pb2.SessionGroup]:
        """Every session group, filtered as the dashboard does by default: each hyperparameter
        limited to its domain (every value checked, the whole interval)."""
        columns = []
        for info in experiment.hparam_infos:
            column = api_pb2.ColParams(hparam=info.name)
            if info.HasField("domain_discrete"):
                column.filter_discrete.CopyFrom(info.domain_discrete)
            elif info.HasField("domain_interval"):
                column.filter_interval.CopyFrom(info.domain_interval)
            columns.append(column)
        columns += [api_pb2.ColParams(metric=m.name) for m in experiment.metric_infos]
        request = api_pb2.ListSessionGroupsRequest(allowed_statuses=ALL_STATUSES, col_params=columns, start_index=0, slice_size=1000)
        return list(self.post("/session_groups", request, api_pb2.ListSessionGroupsResponse).session_groups)

    def scalars(self, run: str, tag: str) -> list:
        found = self.data.read_scalars(
            self.request, experiment_id="", plugin_name="scalars", downsample=1000,
            run_tag_filter=tb_provider.RunTagFilter(runs=[run], tags=[tag]),
        )  # fmt: skip
        return found.get(run, {}).get(tag, [])


def infos_by_name(experiment: api_pb2.Experiment) -> dict[str, api_pb2.HParamInfo]:
    return {info.name: info for info in experiment.hparam_infos}


# -- the root summary, without Ray -------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3").root + "/run"


def test_each_invocation_replaces_the_root_summary_with_the_union(run_dir):
    storage.write_text(storage.join(run_dir, "runs.jsonl"), "{}\n")  # the sweep writes the run's first file first
    cnn = {"optimizer": Choice(("adam", "sgd")), "activation": Choice(("relu", "tanh")), "lr": LogUniform(1e-5, 1e-1), "epochs": IntRange(1, 3)}
    write_run_hparams(run_dir, [({"batch_size": 64, "image_size": None, "cached_features": False, "model": "cnn", "epochs": 5}, cnn)])
    alexnet = {"optimizer": Choice(("rmsprop", "sgd")), "lr": LogUniform(1e-4, 0.5)}
    fixed = {"epochs": 5, "batch_size": 64, "image_size": 64, "cached_features": True, "model": "alexnet", "lr": 1e-3}  # fmt: skip
    write_run_hparams(run_dir, [(fixed, alexnet)])  # e.g. sweeps/all.py adding an experiment to the run

    summaries = [name for name in storage.list_dir(run_dir) if name.endswith(RUN_HPARAMS_SUFFIX)]
    assert len(summaries) == 1
    files, domains = read_run_hparams(*storage.resolve(run_dir))
    assert len(files) == 1
    assert domains == {
        "optimizer": {"adam", "rmsprop", "sgd"},
        "activation": {"relu", "tanh"},  # from the first invocation: kept
        "lr": (1e-5, 0.5),
        "epochs": (1.0, 5.0),  # the searched 1..3, widened by the other experiment's fixed 5
        "batch_size": {64},
        "image_size": {64},  # None (the dataset's own size) is no value
        "cached_features": {False, True},
        "model": {"alexnet", "cnn"},
    }
    # A trial outside the domains (a transfer experiment's activation, known only once it
    # runs) widens them as it starts, through the run root Ray was given.
    fs, root = storage.resolve(run_dir)
    trial = SimpleNamespace(storage=SimpleNamespace(storage_filesystem=fs, storage_fs_path=root))
    TensorBoardCallback()._cover_in_run_hparams(trial, {"activation": "gelu", "lr": 0.01, "model": "cnn"})
    files, widened = read_run_hparams(fs, root)
    assert len(files) == 1 and widened == {**domains, "activation": {"relu", "tanh", "gelu"}}


def test_tensorboard_reads_the_root_summary(tmp_path):
    write_run_hparams(str(tmp_path), [({"compile": False}, {"optimizer": Choice(("adam", "sgd")), "lr": LogUniform(1e-5, 1e-1)})])
    backend = TensorBoardBackend(tmp_path)
    assert backend.runs_with_experiment_summary() == ["."]
    infos = infos_by_name(backend.experiment())
    assert list(infos["optimizer"].domain_discrete) == ["adam", "sgd"] and infos["optimizer"].type == api_pb2.DATA_TYPE_STRING
    assert (infos["lr"].domain_interval.min_value, infos["lr"].domain_interval.max_value) == (1e-5, 1e-1)
    assert list(infos["compile"].domain_discrete) == [False] and infos["compile"].type == api_pb2.DATA_TYPE_BOOL


# -- a real sweep of two experiments into one run directory ------------------------------


@pytest.fixture(scope="module")
def sweep(mnist_run):
    run_dir = mnist_run.run_dir
    # every trial, the re-trainings with other seeds (--repeats) included
    params = [*run_dir.glob("*/*/params.json"), *run_dir.glob("*/repeats/*/params.json")]
    trials = {str(p.parent.relative_to(run_dir)): json.loads(p.read_text()) for p in params}
    searched = [name for name in trials if "/repeats/" not in name]
    assert len(searched) == len(EXPERIMENTS) * MNIST_RUN_SAMPLES and {name.split("/")[0] for name in trials} == set(EXPERIMENTS)
    assert len(trials) > len(searched), "the repeats are trials too"
    return run_dir, trials, TensorBoardBackend(run_dir)


def test_one_experiment_summary_with_every_hyperparameter_and_its_domain(sweep):
    run_dir, trials, backend = sweep
    assert backend.runs_with_experiment_summary() == ["."], "only the run root holds an experiment summary"
    assert len(list(run_dir.rglob(f"*{RUN_HPARAMS_SUFFIX}"))) == 1
    infos = infos_by_name(backend.experiment())
    assert set(infos) >= {"optimizer", "activation", "lr", "epochs", "batch_size", "image_size", "mode", "model", "dataset"}
    assert set(infos["activation"].domain_discrete) == set(CNN_SEARCH_SPACE["activation"].options), "the CNN's searched activations"
    assert set(infos["optimizer"].domain_discrete) >= set(CNN_SEARCH_SPACE["optimizer"].options)
    assert set(infos["mode"].domain_discrete) == {"scratch", "feature_extract"}
    lr = infos["lr"].domain_interval
    assert (lr.min_value, lr.max_value) == (CNN_SEARCH_SPACE["lr"].low, CNN_SEARCH_SPACE["lr"].high)  # AlexNet's range lies inside
    assert infos["epochs"].domain_interval.max_value == 2, "the searched epochs, capped by --max-epochs"
    metrics = {m.display_name: m.name.tag for m in backend.experiment().metric_infos}
    assert {"val_acc", "val_loss", "train_loss", "train_acc", "train_images_per_s", "lr"} <= set(metrics)


def test_every_trial_is_a_session_with_its_hyperparameters(sweep):
    run_dir, trials, backend = sweep
    experiment = backend.experiment()
    groups = backend.session_groups(experiment)
    sessions = {session.name: (group, session) for group in groups for session in group.sessions}
    assert set(sessions) == set(trials), "every trial passes the dashboard's default filters"
    for name, config in trials.items():
        group, session = sessions[name]
        values = json_format.MessageToDict(group)["hparams"]
        assert values == {k: v for k, v in config.items() if v is not None}
        assert session.status == api_pb2.STATUS_SUCCESS
        rows = [json.loads(line) for line in (run_dir / name / "result.json").read_text().splitlines()]
        metric = {m.name.tag: m.value for m in session.metric_values}
        assert metric["accuracy/val"] == pytest.approx(rows[-1]["val_acc"], rel=1e-6)
        assert metric["hparams/epochs_trained"] == len(rows)
    cnn = [json_format.MessageToDict(g)["hparams"] for g in groups if g.hparams["model"].string_value == "cnn"]
    assert cnn and all("activation" in values for values in cnn)


def test_learning_rate_and_throughput_per_epoch_as_scalars(sweep):
    run_dir, trials, backend = sweep
    for name, config in trials.items():
        epochs = len((run_dir / name / "result.json").read_text().splitlines())
        lr = backend.scalars(name, "lr")
        assert [d.step for d in lr] == list(range(1, epochs + 1))
        assert all(d.value == pytest.approx(config["lr"], rel=1e-6) for d in lr), "the optimizer trained with the config's rate"
        throughput = backend.scalars(name, "train_images_per_s")
        assert [d.step for d in throughput] == list(range(1, epochs + 1)) and all(d.value > 0 for d in throughput)


def test_a_trials_progress_line_names_every_value_its_searcher_chose():
    result = {"epoch": 1, "train_loss": 1.0962, "val_acc": 0.4222}
    factory = SimpleNamespace(trial_id="4a38ac0d", evaluated_params={"optimizer": "adam", "lr": 0.006434, "epochs": 2, "dropout": 0.21234, "hidden": 16},
                              config={"optimizer": "adam", "lr": 0.006434, "epochs": 2, "dropout": 0.21234, "hidden": 16, "batch_size": 64})  # fmt: skip
    assert progress_line(factory, result) == "  4a38ac0d (optimizer=adam, lr=0.00643, dropout=0.212, hidden=16) epoch 1/2: train_loss 1.096  val_acc 42.22%"
    seed = SimpleNamespace(trial_id="af93b9ec", evaluated_params={}, config={"optimizer": "adamw", "activation": "relu", "lr": 0.00294, "epochs": 4, "model": "cnn"})
    assert progress_line(seed, result).startswith("  af93b9ec (optimizer=adamw, activation=relu, lr=0.00294) epoch 1/4")
    backbones = SimpleNamespace(trial_id="1", evaluated_params={"lr": 0.1, "model": "resnet18", "mode": "finetune"},
                                config={"model": "resnet18", "mode": "finetune", "optimizer": "sgd", "lr": 0.1, "epochs": 3})  # fmt: skip
    assert "(model=resnet18, mode=finetune, optimizer=sgd, lr=0.1)" in progress_line(backbones, result)
