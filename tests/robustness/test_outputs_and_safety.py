"""Output-folder guards, resume-config checks, the dirty-data gate, second Ctrl-C, and hub safety."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
from pathlib import Path

import pytest

from tuner.config.load import write_resolved_config
from tuner.config.schema import RunConfig
from tuner.data.check import DataReport
from tuner.data.problems import Problem
from tuner.errors import CheckpointError, ConfigError, DataError
from tuner.runtime.hub import apply_hub_settings
from tuner.training.bad_data import admit_dataset
from tuner.training.outputs import prepare_output_folder
from tuner.training.signals import StopRequests

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, **train) -> RunConfig:
    return RunConfig.model_validate({"task": "sdxl-lora", "output": {"dir": str(tmp_path)}, "train": train})


def test_resume_refuses_changed_keys_and_reports_safe_ones(tmp_path: Path) -> None:
    write_resolved_config(_config(tmp_path, max_steps=10), tmp_path)
    changed = _config(tmp_path, max_steps=10, seed=7, batch_size=4).model_dump(mode="json")
    with pytest.raises(ConfigError) as error:
        prepare_output_folder(tmp_path, changed, "latest", overwrite=False)
    assert "train.seed" in error.value.message and "train.batch_size" in error.value.message
    notes = prepare_output_folder(
        tmp_path, _config(tmp_path, max_steps=20).model_dump(mode="json"), "latest", overwrite=False
    )
    assert notes == ["resuming with train.max_steps changed: 10 -> 20"]


def test_finished_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoints" / "step-000002").mkdir(parents=True)
    (tmp_path / "cache").mkdir()
    config = _config(tmp_path).model_dump(mode="json")
    with pytest.raises(ConfigError, match="finished run"):
        prepare_output_folder(tmp_path, config, None, overwrite=False)
    prepare_output_folder(tmp_path, config, None, overwrite=True)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "cache").is_dir()


def test_unfinished_run_is_refused_without_resume(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"step": 2, "files": {}}))
    with pytest.raises(CheckpointError, match="--resume latest"):
        prepare_output_folder(tmp_path, _config(tmp_path).model_dump(mode="json"), None, overwrite=False)


def _report(bad: int, good: int) -> DataReport:
    problems = [Problem(f"/d/{i}.png", "unreadable-image", "cannot decode", "replace it") for i in range(bad)]
    return DataReport("sdxl", "/d", good, problems, stats={}, histogram="")


def test_dirty_data_stops_with_the_report_and_writes_nothing_else(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        admit_dataset(_report(25, 75), tmp_path, skip_bad=False, max_bad_fraction=0.05)
    assert "/d/19.png" in error.value.message and "/d/20.png" not in error.value.message
    assert "5 more" in error.value.message and "--skip-bad" in error.value.hint
    assert [path.name for path in tmp_path.iterdir()] == ["data_report.txt"]
    assert "/d/24.png" in (tmp_path / "data_report.txt").read_text()


def test_skip_bad_logs_each_skipped_sample_and_still_stops_above_the_fraction(tmp_path: Path) -> None:
    assert admit_dataset(_report(2, 98), tmp_path, skip_bad=True, max_bad_fraction=0.05) == 2
    records = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [record["file"] for record in records] == ["/d/0.png", "/d/1.png"]
    assert "cannot decode" in records[0]["why"]
    with pytest.raises(DataError) as error:
        admit_dataset(_report(10, 90), tmp_path / "other", skip_bad=True, max_bad_fraction=0.05)
    assert "10.0%" in error.value.hint


def test_only_the_main_process_prints_and_logs_the_data_problems(tmp_path: Path, capsys) -> None:
    report = _report(2, 98)
    report.warnings = [Problem("/d/a.png", "duplicate-image", "same picture as /d/b.png", "fine")]
    # Every process reaches the same decision...
    assert admit_dataset(report, tmp_path, skip_bad=True, max_bad_fraction=0.05, main_process=False) == 2
    with pytest.raises(DataError):
        admit_dataset(_report(10, 90), tmp_path, skip_bad=True, max_bad_fraction=0.05, main_process=False)
    # ...but the others write and print nothing, so skipped.jsonl and the console hold one copy.
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().out == ""
    admit_dataset(report, tmp_path, skip_bad=True, max_bad_fraction=0.05, main_process=True)
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 2
    assert "same picture as /d/b.png" in capsys.readouterr().out


def test_a_second_sigint_aborts_at_once() -> None:
    with StopRequests() as requests:
        os.kill(os.getpid(), signal.SIGINT)
        assert requests.requested == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_no_code_sets_a_ca_bundle_variable_to_an_empty_string(tmp_path: Path) -> None:
    blank = re.compile(r"""(CURL_CA_BUNDLE|REQUESTS_CA_BUNDLE)["']?\s*\]?\s*=\s*["']{2}""")
    offenders = [
        str(path) for path in (REPO / "tuner").rglob("*.py") if blank.search(path.read_text(encoding="utf-8"))
    ]
    assert offenders == []
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    for ca_bundle, offline in itertools.product([None, str(bundle)], [False, True]):
        env: dict[str, str] = {}
        apply_hub_settings(ca_bundle=ca_bundle, offline=offline, env=env)
        assert all(env.get(name) != "" for name in ("CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE"))
