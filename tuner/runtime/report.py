"""`tuner env`: what this machine offers, what a run would use, and (on Ascend) a pre-flight check list."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import tuner
from tuner.errors import TunerError
from tuner.runtime import device, npu, stack

CA_VARIABLES = ("TUNER_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")
DEFAULT_CANN_HOME = "/usr/local/Ascend/ascend-toolkit/latest"
CANN_SET_ENV_FIX = "source /usr/local/Ascend/ascend-toolkit/set_env.sh (or your CANN install's set_env.sh)"

T = TypeVar("T")


def _safely(probe: Callable[[], T], fallback: T) -> T:
    # The report exists to diagnose broken installs, so no probe failure may stop it.
    try:
        return probe()
    except Exception:
        return fallback


def environment_report(runtime_device: str = "auto", mixed_precision: str = "auto") -> dict[str, Any]:
    """Everything `tuner env` prints, as JSON-ready data. Never raises because a probe failed."""
    npu_probe = _safely(npu.probe_npu, npu.NpuProbe(installed=False, import_error="probe failed"))
    cuda_probe = _safely(device.probe_cuda, device.CudaProbe(error="probe failed"))
    report: dict[str, Any] = {
        "requested_device": runtime_device,
        "device_type": None,
        "device_count": 0,
        "device_names": [],
        "mixed_precision": None,
        "device_error": None,
    }
    try:
        runtime = device.choose_runtime(runtime_device, mixed_precision, npu_probe, cuda_probe)
    except TunerError as error:
        report["device_error"] = str(error)
    else:
        names = {"npu": npu_probe.device_names, "cuda": cuda_probe.device_names}.get(runtime.device_type, ())
        report.update(
            device_type=runtime.device_type,
            device_count=runtime.device_count,
            device_names=list(names),
            mixed_precision=runtime.mixed_precision,
        )
    report["versions"] = _versions(npu_probe)
    report["stack_problems"] = [
        {"problem": problem, "fix": fix}
        for problem, fix in _safely(lambda: stack.stack_problems(report["versions"]), [])
    ]
    report["hub"] = hub_settings_in_effect(os.environ)
    report["accelerate_config"] = _safely(_accelerate_config, {"path": None, "exists": False})
    wants_npu = runtime_device == "npu" or report["device_type"] == "npu" or npu_probe.installed
    report["npu_checks"] = _safely(lambda: npu_preflight(npu_probe, os.environ), []) if wants_npu else []
    return report


def _versions(npu_probe: npu.NpuProbe) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "tuner": tuner.__version__}
    versions.update(_safely(stack.installed_versions, {}))
    if npu_probe.torch_npu_version:
        versions["torch_npu"] = npu_probe.torch_npu_version
    versions["cuda_build"] = _safely(_torch_cuda_version, None)
    versions["cann"] = _safely(lambda: cann_version(os.environ), None)
    return versions


def _torch_cuda_version() -> str | None:
    import torch

    return torch.version.cuda


def cann_version(env: Mapping[str, str]) -> str | None:
    """The CANN toolkit version from its version.info files (e.g. runtime/version.info: Version=8.0.0)."""
    home = Path(env.get("ASCEND_TOOLKIT_HOME") or DEFAULT_CANN_HOME)
    for info in [home / "version.info", *sorted(home.glob("*/version.info"))]:
        if not info.is_file():
            continue
        for line in info.read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip().lower() == "version" and value.strip():
                return value.strip()
    return None


def redact_proxy(url: str) -> str:
    """Hide the user:password part of a proxy URL, with or without a scheme."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rsplit("@", 1)[1]
    return f"{scheme}{separator}{authority}{slash}{path}"


def hub_settings_in_effect(env: Mapping[str, str]) -> dict[str, Any]:
    proxies: dict[str, str] = {}
    for name in PROXY_VARIABLES:
        for spelled in (name, name.lower()):
            if spelled in env:
                proxies[spelled] = redact_proxy(env[spelled])
    return {
        "endpoint": env.get("HF_ENDPOINT") or "https://huggingface.co",
        "offline": env.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"},
        "ca_bundle": {name: env[name] for name in CA_VARIABLES if name in env},
        "proxies": proxies,
        "token": "set" if env.get("HF_TOKEN") else "not set",
    }


def _accelerate_config() -> dict[str, Any]:
    from accelerate.commands.config.config_args import default_config_file

    path = Path(default_config_file)
    return {"path": str(path), "exists": path.is_file(), "num_processes": _configured_processes(path)}


def _configured_processes(config_file: Path) -> int | None:
    if not config_file.is_file():
        return None
    import yaml

    config = yaml.safe_load(config_file.read_text()) or {}
    processes = config.get("num_processes")
    return int(processes) if processes is not None else None


def _check(name: str, ok: bool, detail: str, fix: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "detail": detail, "fix": "" if ok else fix}


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def npu_preflight(probe: npu.NpuProbe, env: Mapping[str, str]) -> list[dict[str, Any]]:
    """Checks that catch the usual Ascend setup mistakes before a run spends time loading models."""
    checks = []
    cann_home = env.get("ASCEND_TOOLKIT_HOME") or env.get("ASCEND_HOME_PATH")
    checks.append(
        _check(
            "CANN environment sourced",
            bool(cann_home),
            f"ASCEND_TOOLKIT_HOME={cann_home}"
            if cann_home
            else "ASCEND_TOOLKIT_HOME and ASCEND_HOME_PATH unset",
            CANN_SET_ENV_FIX,
        )
    )
    checks.append(
        _check(
            "torch_npu imports",
            probe.installed and probe.import_error is None,
            "not installed"
            if not probe.installed
            else probe.import_error or f"torch_npu {probe.torch_npu_version}",
            "pip install 'tuner[ascend]'" if not probe.installed else CANN_SET_ENV_FIX,
        )
    )
    torch_version = _safely(lambda: metadata.version("torch"), None)
    torch_npu_version = probe.torch_npu_version or _safely(lambda: metadata.version("torch_npu"), None)
    if torch_version and torch_npu_version:
        # torch_npu releases pin torch exactly: torch_npu X.Y.* works only with torch X.Y.*.
        matches = _major_minor(torch_version) == _major_minor(torch_npu_version)
        checks.append(
            _check(
                "torch and torch_npu versions belong together",
                matches,
                f"torch {torch_version}, torch_npu {torch_npu_version}",
                f"pip install 'torch=={_major_minor(torch_npu_version)}.*' "
                f"(or the torch_npu release for torch {_major_minor(torch_version)})",
            )
        )
    if torch_version and torch_npu_version:
        checks.append(_trio_check(torch_version, torch_npu_version, cann_version(env)))
    visible = env.get("ASCEND_RT_VISIBLE_DEVICES")
    processes_text = env.get("LOCAL_WORLD_SIZE") or None
    processes = int(processes_text) if processes_text and processes_text.isdigit() else None
    if processes is None:
        processes = _safely(lambda: _accelerate_config()["num_processes"], None)
    detail = f"{probe.device_count} NPU(s) visible" + (
        f" (ASCEND_RT_VISIBLE_DEVICES={visible})" if visible else ""
    )
    if processes is not None:
        detail += f", {processes} process(es) requested"
    checks.append(
        _check(
            "visible NPUs cover the processes requested",
            probe.device_count > 0 and (processes is None or processes <= probe.device_count),
            detail,
            "check npu-smi info; widen ASCEND_RT_VISIBLE_DEVICES / --devices or lower --num_processes",
        )
    )
    return checks


def _trio_check(torch_version: str, torch_npu_version: str, cann: str | None) -> dict[str, Any]:
    """The torch / torch_npu / CANN trio found, and whether it is one tuner lists (stack.ASCEND_TRIOS)."""
    found = f"torch {torch_version}, torch_npu {torch_npu_version}, CANN {cann or 'not found'}"
    trio = stack.ascend_trio_of(torch_version, torch_npu_version, cann)
    known = "; ".join(
        f"torch_npu {t.torch_npu} + torch {t.torch} on CANN {t.cann} ({t.source})" for t in stack.ASCEND_TRIOS
    )
    return _check(
        "torch / torch_npu / CANN trio",
        trio is not None,
        f"{found}: the trio of {trio.source}" if trio else f"{found}: not a trio tuner lists",
        f"install a listed trio: {known}",
    )


def format_environment_report(report: Mapping[str, Any]) -> str:
    """A few aligned lines for humans; `tuner env --json` prints the dict itself."""
    rows: list[tuple[str, str]] = []
    if report.get("device_error"):
        rows.append(("device", f"unavailable: {report['device_error']}"))
    else:
        names = ", ".join(report.get("device_names") or [])
        rows.append(
            (
                "device",
                f"{report['device_type']} x{report['device_count']}" + (f" ({names})" if names else ""),
            )
        )
        rows.append(("mixed precision", str(report["mixed_precision"])))
    versions = report.get("versions", {})
    rows.append(("versions", ", ".join(f"{name} {value}" for name, value in versions.items() if value)))
    problems = report.get("stack_problems", [])
    if not problems:
        rows.append(("library stack", "ok: no known-broken combination"))
    for problem in problems:
        rows.append(("library stack", f"FAIL {problem['problem']} -> {problem['fix']}"))
    hub = report.get("hub", {})
    rows.append(("hub endpoint", f"{hub.get('endpoint')}" + (" (offline)" if hub.get("offline") else "")))
    for name, value in hub.get("ca_bundle", {}).items():
        rows.append((name, repr(value) if value == "" else value))
    for name, value in hub.get("proxies", {}).items():
        rows.append((name, value))
    accelerate_config = report.get("accelerate_config", {})
    rows.append(
        (
            "accelerate config",
            f"{accelerate_config.get('path')} ({'found' if accelerate_config.get('exists') else 'none'})",
        )
    )
    for check in report.get("npu_checks", []):
        line = f"{'ok  ' if check['ok'] else 'FAIL'} {check['detail']}"
        if not check["ok"] and check["fix"]:
            line += f" -> {check['fix']}"
        rows.append((check["name"], line))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)
