"""Trackers: every scalar the loop logs reaches Accelerate's trackers; missing packages are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from cli_runner import run_cli

from tuner.errors import ConfigError
from tuner.training import trackers as tracking
from tuner.training.metrics import MetricsLog


class RecordingTracker(GeneralTracker):
    name = "recording"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.config: dict = {}
        self.logged: list[tuple[dict, int]] = []
        self.tables: list[tuple[str, list, list, int]] = []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((values, step))

    def log_table(self, table_name, columns=None, data=None, dataframe=None, step=None, **kwargs) -> None:
        self.tables.append((table_name, columns, data, step))


def test_scalars_and_config_reach_the_trackers(tmp_path):
    accelerator = Accelerator(cpu=True)
    tracker = RecordingTracker()
    accelerator.log_with = [tracker]
    accelerator.init_trackers(
        "tuner", config=tracking.flat_config({"optim": {"lr": 1e-3, "betas": [0.9, 0.99]}})
    )
    assert tracker.config == {"optim.lr": 1e-3, "optim.betas": "[0.9, 0.99]"}
    metrics = MetricsLog(tmp_path, accelerator.trackers)
    metrics.write({"step": 5, "epoch": 1.0, "loss": 0.5, "lr": 1e-3, "loss_skipped": None, "finite": True})
    metrics.write({"step": 10, "validation_loss": 0.4})
    metrics.close()
    assert tracker.logged == [({"epoch": 1.0, "loss": 0.5, "lr": 1e-3}, 5), ({"validation_loss": 0.4}, 10)]
    tracking.log_sample_answers(accelerator, 10, [{"question": "Q?", "answer": "A", "reference": "B"}])
    assert tracker.tables == [("sample_answers", ["question", "answer", "reference"], [["Q?", "A", "B"]], 10)]


def test_unknown_or_missing_tracker_is_a_clear_error(monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'"):
        tracking.check_trackers(["neptune"])
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs the mlflow package") as error:
        tracking.check_trackers(["mlflow"])
    assert "tuner[mlflow]" in error.value.hint


def _event_accumulator(run_dir):
    """Every TensorBoard event file of the run, read by TensorBoard's own reader (the hyper-parameters
    are written into a sub-folder per add_hparams call)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    readers = []
    for events in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        reader = EventAccumulator(str(events), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
        readers.append(reader.Reload())
    return readers


def _tensorboard_hparams(readers) -> dict:
    """The hyper-parameters of the run as TensorBoard's HParams plugin reads them."""
    from tensorboard.plugins.hparams import metadata

    for reader in readers:
        try:
            content = reader.PluginTagToContent(metadata.PLUGIN_NAME)
        except KeyError:  # an event file without hyper-parameters
            continue
        info = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
        return dict(info.hparams)
    raise AssertionError("no hyper-parameters in the TensorBoard events")


def _assert_series(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


def _mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (experiment,) = client.search_experiments(filter_string="name = 'tuner'")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


@pytest.mark.slow
def test_a_qwenvl_run_logs_scalars_config_and_answers_to_tensorboard_and_mlflow(
    tmp_path, capsys, monkeypatch
):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    code, _, stderr = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(run_dir), "--max-steps", "2"),
        *("--log-with", "tensorboard", "--log-with", "mlflow", "--set", "output.log_every=1"),
        *("--set", "output.eval_data=tiny", "--lr", "2e-3"),
    )
    assert code == 0, stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    overall = next(r["eval/overall"] for r in records if "eval/overall" in r)

    readers = _event_accumulator(run_dir)
    scalars = {
        tag: [(e.step, e.value) for e in r.Scalars(tag)] for r in readers for tag in r.Tags()["scalars"]
    }
    _assert_series(scalars["loss"], losses)
    _assert_series(scalars["eval/overall"], [(2, overall)])
    hparams = _tensorboard_hparams(readers)
    assert hparams["optim.lr"].number_value == 2e-3 and hparams["output.eval_data"].string_value == "tiny"
    answers = [
        r.Tensors("sample_answers/text_summary")
        for r in readers
        if "sample_answers/text_summary" in r.Tags()["tensors"]
    ]
    (text,) = [event.tensor_proto.string_val[0].decode() for events in answers for event in events]
    assert text.startswith("| question | answer | reference |")

    client, run = _mlflow_run(run_dir)
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["task"] == "qwenvl-lora"
    history = client.get_metric_history(run.info.run_id, "loss")
    _assert_series([(metric.step, metric.value) for metric in history], losses)
    assert run.data.metrics["eval/overall"] == pytest.approx(overall)
    (artifact,) = client.list_artifacts(run.info.run_id, "sample_answers")
    table = client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path))
    assert Path(table).read_text().startswith("| question | answer | reference |")


@pytest.mark.slow
def test_an_sdxl_run_logs_sample_grids_to_tensorboard_and_mlflow(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    code, _, stderr = run_cli(
        capsys,
        *("train", "sdxl-lora", "--preset", "tiny-cpu", "--output", str(run_dir), "--max-steps", "2"),
        *("--log-with", "tensorboard", "--log-with", "mlflow", "--set", "output.sample_steps=2"),
    )
    assert code == 0, stderr
    images = [
        event
        for r in _event_accumulator(run_dir)
        if "samples" in r.Tags()["images"]
        for event in r.Images("samples")
    ]
    assert [event.step for event in images] == [2]
    assert images[0].encoded_image_string.startswith(b"\x89PNG")

    client, run = _mlflow_run(run_dir)
    assert run.data.params["task"] == "sdxl-lora"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2]
    logged = [artifact.path for artifact in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in path and path.endswith(".png") for path in logged), logged


def _wandb_records(run_dir: Path) -> list[dict]:
    """The offline W&B run's records, read by W&B's own reader (`wandb leet inspect --json`)."""
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    wandb_cli = Path(sys.executable).parent / "wandb"
    listing = subprocess.run(
        [str(wandb_cli), "leet", "inspect", str(offline_run), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [json.loads(line) for line in listing.stdout.splitlines() if line.startswith("{")]


def _swanlab_records(run_dir: Path) -> list[dict]:
    """The local SwanLab run's records, read by SwanLab's own data-store reader."""
    from google.protobuf.json_format import MessageToDict
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (store,) = (run_dir / "swanlog").glob("run-*/run-*.swanlab")
    reader = DataStoreReader()
    reader.open(store)
    records = []
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        records.append(MessageToDict(record, always_print_fields_with_no_presence=True))
    reader.close()
    return records


@pytest.fixture
def offline_trackers(monkeypatch):
    """W&B and SwanLab with nothing set but the run being offline: tuner must pick their offline modes."""
    for name in ("WANDB_MODE", "SWANLAB_MODE", "WANDB_API_KEY", "SWANLAB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.slow
def test_a_qwenvl_run_logs_scalars_config_and_answers_to_wandb_and_swanlab_offline(
    tmp_path, capsys, offline_trackers
):
    pytest.importorskip("wandb")
    pytest.importorskip("swanlab")
    run_dir = tmp_path / "run"
    code, _, stderr = run_cli(
        capsys,
        *("train", "qwenvl-lora", "--preset", "tiny-cpu", "--output", str(run_dir), "--max-steps", "2"),
        *("--log-with", "wandb", "--log-with", "swanlab", "--set", "output.log_every=1"),
        *("--set", "output.eval_data=tiny", "--lr", "2e-3"),
    )
    assert code == 0, stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    overall = next(r["eval/overall"] for r in records if "eval/overall" in r)

    wandb_records = _wandb_records(run_dir)
    history = [r["history"] for r in wandb_records if r["type"] == "history"]
    _assert_series([(h["step"]["num"], h["item"]["loss"]) for h in history if "loss" in h["item"]], losses)
    assert [h["item"]["eval/overall"] for h in history if "eval/overall" in h["item"]] == [
        pytest.approx(overall)
    ]
    config = {
        key: value
        for r in wandb_records
        if r["type"] == "config"
        for key, value in r["config"]["update"].items()
    }
    assert config["optim.lr"] == 2e-3 and config["task"] == "qwenvl-lora"
    # The answers table is logged as a W&B table artifact (its rows are uploaded files, not records).
    assert any(
        "sample_answers" in json.dumps(r) for r in wandb_records if r["type"] in ("history", "summary")
    )

    swanlab_records = _swanlab_records(run_dir)
    scalars = [r["scalar"] for r in swanlab_records if "scalar" in r]
    _assert_series([(int(s["step"]), s["value"]["number"]) for s in scalars if s["key"] == "loss"], losses)
    assert [s["value"].get("number", 0.0) for s in scalars if s["key"] == "eval/overall"] == [
        pytest.approx(overall)
    ]
    (swanlab_config,) = (run_dir / "swanlog").glob("run-*/files/config.yaml")
    saved = yaml.safe_load(swanlab_config.read_text())
    assert saved["optim.lr"]["value"] == 2e-3 and saved["task"]["value"] == "qwenvl-lora"
    columns = {r["column"]["columnKey"]: r["column"]["columnType"] for r in swanlab_records if "column" in r}
    assert columns["sample_answers"] == "COLUMN_TYPE_TEXT"


@pytest.mark.slow
def test_an_sdxl_run_logs_sample_grids_to_wandb_and_swanlab_offline(tmp_path, capsys, offline_trackers):
    pytest.importorskip("wandb")
    pytest.importorskip("swanlab")
    run_dir = tmp_path / "run"
    code, _, stderr = run_cli(
        capsys,
        *("train", "sdxl-lora", "--preset", "tiny-cpu", "--output", str(run_dir), "--max-steps", "2"),
        *("--log-with", "wandb", "--log-with", "swanlab", "--set", "output.sample_steps=2"),
    )
    assert code == 0, stderr
    history = [r["history"] for r in _wandb_records(run_dir) if r["type"] == "history"]
    # W&B flattens the logged image list into `samples.*` history keys naming the stored files.
    images = [(h["step"]["num"], h["item"]["samples._type"]) for h in history if "samples._type" in h["item"]]
    assert images == [(2, "images/separated")]
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/images/samples_2_*.png"))

    swanlab_records = _swanlab_records(run_dir)
    columns = {r["column"]["columnKey"]: r["column"]["columnType"] for r in swanlab_records if "column" in r}
    assert columns["samples"] == "COLUMN_TYPE_IMAGE"
    assert [
        int(r["media"]["step"]) for r in swanlab_records if r.get("media", {}).get("key") == "samples"
    ] == [2]
    assert list((run_dir / "swanlog").glob("run-*/media/**/*.png"))
