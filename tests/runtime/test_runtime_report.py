"""`tuner env`: the report on this CPU machine, with failing probes, and the Ascend pre-flight checks."""

from __future__ import annotations

import json

import pytest

from tuner.runtime import device, environment_report, format_environment_report, npu
from tuner.runtime.npu import NpuProbe
from tuner.runtime.report import cann_version, npu_preflight, redact_proxy

REPORT_KEYS = {
    "requested_device",
    "device_type",
    "device_count",
    "device_names",
    "mixed_precision",
    "device_error",
    "versions",
    "hub",
    "accelerate_config",
    "npu_checks",
    "stack_problems",
}


def test_report_on_this_cpu_machine():
    report = environment_report()
    assert set(report) == REPORT_KEYS
    assert (report["device_type"], report["mixed_precision"], report["device_error"]) == ("cpu", "no", None)
    assert report["npu_checks"] == []  # torch_npu is not installed here
    import torch

    assert torch.__version__.startswith(report["versions"]["torch"])
    assert report["versions"]["torch_npu"] is None
    assert {"path", "exists"} <= set(report["accelerate_config"])
    json.dumps(report)  # `tuner env --json` prints it as is
    text = format_environment_report(report)
    assert "mixed precision" in text and "cpu" in text


def test_report_survives_probes_that_raise(monkeypatch):
    def exploding_probe():
        raise RuntimeError("driver crashed")

    monkeypatch.setattr(npu, "probe_npu", exploding_probe)
    monkeypatch.setattr(device, "probe_cuda", exploding_probe)
    report = environment_report("cuda", "auto")
    assert report["device_type"] is None and "CUDA" in report["device_error"]
    assert "unavailable" in format_environment_report(report)


def test_proxy_credentials_never_reach_the_report(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://alice:s3cret@proxy.corp:8080")
    monkeypatch.setenv("http_proxy", "bob:hunter2@proxy.corp:3128")
    report = environment_report()
    assert report["hub"]["proxies"]["HTTPS_PROXY"] == "http://***@proxy.corp:8080"
    text = json.dumps(report) + format_environment_report(report)
    assert "s3cret" not in text and "hunter2" not in text and "proxy.corp:3128" in text


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy:3128", "http://proxy:3128"),
        ("http://u:p@proxy:3128/path", "http://***@proxy:3128/path"),
        ("u:p@proxy:3128", "***@proxy:3128"),
    ],
)
def test_redact_proxy(url, expected):
    assert redact_proxy(url) == expected


def test_cann_version_is_read_from_version_info(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "version.info").write_text("Version=8.0.RC3\nversion_dir=8.0.RC3\n")
    assert cann_version({"ASCEND_TOOLKIT_HOME": str(tmp_path)}) == "8.0.RC3"
    assert cann_version({"ASCEND_TOOLKIT_HOME": str(tmp_path / "absent")}) is None


def checks_by_name(checks):
    return {check["name"]: check for check in checks}


def test_npu_preflight_flags_the_usual_mistakes(monkeypatch):
    monkeypatch.setattr("tuner.runtime.report.metadata.version", lambda name: "2.14.1")
    probe = NpuProbe(installed=True, torch_npu_version="2.13.0.post1", device_count=2, bf16_supported=True)
    checks = checks_by_name(npu_preflight(probe, {"LOCAL_WORLD_SIZE": "4"}))
    assert all(set(check) == {"name", "ok", "detail", "fix"} for check in checks.values())
    assert not checks["CANN environment sourced"]["ok"]
    assert "set_env.sh" in checks["CANN environment sourced"]["fix"]
    assert checks["torch_npu imports"]["ok"]
    versions = checks["torch and torch_npu versions belong together"]
    assert not versions["ok"] and "torch==2.13.*" in versions["fix"]
    processes = checks["visible NPUs cover the processes requested"]
    assert not processes["ok"] and "4 process" in processes["detail"]


def _cann_home(tmp_path, version: str) -> str:
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "version.info").write_text(f"Version={version}\n")
    return str(tmp_path)


def test_npu_preflight_passes_a_good_setup(monkeypatch, tmp_path):
    monkeypatch.setattr("tuner.runtime.report.metadata.version", lambda name: "2.14.0+cpu")
    probe = NpuProbe(installed=True, torch_npu_version="2.14.0", device_count=8, bf16_supported=True)
    env = {"ASCEND_TOOLKIT_HOME": _cann_home(tmp_path, "9.1.0"), "LOCAL_WORLD_SIZE": "8"}
    checks = npu_preflight(probe, env)
    assert [check["ok"] for check in checks] == [True] * 5
    assert all(check["fix"] == "" for check in checks)
    trio = checks_by_name(checks)["torch / torch_npu / CANN trio"]
    assert trio["detail"] == (
        "torch 2.14.0+cpu, torch_npu 2.14.0, CANN 9.1.0: the trio of constraints-ascend.txt"
    )


def test_tuner_env_names_the_ascend_trio_it_found_and_the_ones_it_lists(capsys, monkeypatch, tmp_path):
    from cli_runner import run_cli

    # torch_npu 2.14.0 beside the lock's torch 2.14.1, on an older CANN: the install the issue saw fail.
    monkeypatch.setattr(npu, "probe_npu", lambda: NpuProbe(installed=True, torch_npu_version="2.14.0"))
    monkeypatch.setenv("ASCEND_TOOLKIT_HOME", _cann_home(tmp_path, "8.5.0"))
    monkeypatch.setattr("tuner.runtime.report.metadata.version", lambda name: "2.14.1")
    code, out, _ = run_cli(capsys, "env")
    assert code == 0
    [line] = [line for line in out.splitlines() if line.startswith("torch / torch_npu / CANN trio")]
    assert "FAIL torch 2.14.1, torch_npu 2.14.0, CANN 8.5.0: not a trio tuner lists" in line
    assert "torch_npu 2.14.0 + torch 2.14.0 on CANN 9.1.0 (constraints-ascend.txt)" in line
    assert "torch_npu 2.12.0 + torch 2.12.0 on CANN 9.1.0 (Dockerfile.ascend)" in line


def test_report_on_a_broken_ascend_install_explains_the_failure(monkeypatch):
    broken = NpuProbe(installed=True, import_error="OSError: libhccl.so: cannot open shared object file")
    monkeypatch.setattr(npu, "probe_npu", lambda: broken)
    monkeypatch.delenv("ASCEND_TOOLKIT_HOME", raising=False)
    monkeypatch.delenv("ASCEND_HOME_PATH", raising=False)
    report = environment_report("npu")
    assert "libhccl.so" in report["device_error"]
    imports = checks_by_name(report["npu_checks"])["torch_npu imports"]
    assert not imports["ok"] and "libhccl.so" in imports["detail"]
    assert "FAIL" in format_environment_report(report)
