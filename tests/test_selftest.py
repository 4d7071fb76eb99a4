"""`tuner selftest`: the CPU form end to end, and how results are classified and shown."""

from __future__ import annotations

import pytest

from tuner.cli.main import main
from tuner.selftest import CheckResult, _run_family, format_results, selftest_devices


def test_a_failing_check_skips_the_rest_and_a_missing_module_is_not_available():
    def fails() -> None:
        raise RuntimeError("out of memory")

    def missing() -> None:
        raise ImportError("No module named 'tuner.models.sdxl_merge'")

    results = _run_family(
        "cpu",
        "sdxl",
        [("build", lambda: None), ("merge", missing), ("train", fails), ("infer", lambda: None)],
    )
    assert [r.status for r in results] == ["pass", "not available", "fail", "skipped"]
    assert results[2].detail.startswith("RuntimeError: out of memory")
    table = format_results(results)
    assert "1 of 4 checks passed, 1 failed, 1 not available in this build" in table
    assert "RuntimeError: out of memory" in table and "Traceback" not in table


def test_all_devices_always_include_the_cpu_and_an_explicit_device_is_kept():
    assert "cpu" in selftest_devices(None, all_devices=True)
    assert selftest_devices("npu", all_devices=False) == ["npu"]


@pytest.mark.slow
def test_cpu_selftest_trains_merges_and_infers_both_families(tmp_path, capsys):
    main(["selftest", "--device", "cpu", "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "8 of 8 checks passed" in out, out
    for family in ("sdxl", "qwenvl"):
        for check in ("build", "train", "merge", "infer"):
            assert any(line.split()[:4] == ["cpu", family, check, "pass"] for line in out.splitlines())
    assert (tmp_path / "cpu" / "sdxl" / "infer.png").is_file()
    assert (tmp_path / "cpu" / "qwenvl" / "train" / "adapter_model.safetensors").is_file()


def test_format_results_aligns_columns():
    results = [
        CheckResult("cpu", "sdxl", "train", "pass", 1.25),
        CheckResult("cuda", "qwenvl", "infer", "fail", 0.5, "boom"),
    ]
    lines = format_results(results).splitlines()
    assert lines[0].split() == ["device", "model", "check", "result", "seconds"]
    assert lines[1].index("sdxl") == lines[2].index("qwenvl") and lines[2].endswith("boom")
