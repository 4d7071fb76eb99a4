"""Certificate failures at the hub, end to end, against a local HTTPS hub with a private CA (127.0.0.1 only).

The CLI runs in subprocesses: each starts online (tests/conftest.py forces the session offline), with an
empty HF_HOME and HF_ENDPOINT at the local server, like a first run on a cluster behind a TLS-inspecting
proxy.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import requests
import urllib3
import yaml
from formats.sdxl_lora_files import write_adapter
from hub_server import CA_NAME, start_hub_server
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from tuner.runtime.hub import hub_error_from
from tuner.runtime.tls import certificate_failure, presented_chain

TUNER = Path(sys.executable).with_name("tuner")
REASON = "unable to get local issuer certificate"
SDXL_REPO, QWEN_REPO = "org/tiny-sdxl", "org/tiny-qwen2-vl"


def _verify_error() -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {REASON}"
    )
    error.verify_message = REASON
    return error


def _wrapped(outer: BaseException, *inner: BaseException) -> BaseException:
    """`outer` raised from inner[0], raised from inner[1]...: what libraries build with `raise ... from`."""
    for wrapper, cause in itertools.pairwise([outer, *inner]):
        wrapper.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "error",
    [
        # transformers 5.23 over huggingface_hub 2.4 (httpx2)
        _wrapped(
            OSError("We couldn't connect to 'https://hub' to load the files"),
            LocalEntryNotFoundError("not in cache"),
            httpx2.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]"),
            _verify_error(),
        ),
        # ModelScope / requests: SSLError(MaxRetryError(reason=urllib3 SSLError(the ssl error)))
        requests.exceptions.SSLError(
            urllib3.exceptions.MaxRetryError(
                None, "https://hub/x", urllib3.exceptions.SSLError(_verify_error())
            )
        ),
        # a wrapper that kept only the text
        OSError(
            "HTTPSConnectionPool(host='hub', port=443): Max retries exceeded (Caused by SSLError("
            f"'[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {REASON} (_ssl.c:1006)'))"
        ),
    ],
    ids=["transformers-httpx2", "modelscope-requests", "text-only"],
)
def test_certificate_failures_are_found_whatever_wraps_them(error):
    failure = certificate_failure(error)
    assert failure is not None and failure.reason == REASON


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(
        status, request=httpx2.Request("HEAD", "https://hub/org/x/resolve/main/config.json")
    )


@pytest.mark.parametrize(
    "error",
    [
        _wrapped(httpx2.ConnectError("[Errno -2] Name or service not known"), socket.gaierror(-2, "unknown")),
        _wrapped(
            httpx2.ConnectError("[Errno 111] Connection refused"), ConnectionRefusedError(111, "refused")
        ),
        httpx2.ConnectTimeout("timed out"),
        _wrapped(
            OSError("org/x is not a local folder and is not a valid model identifier"),
            RepositoryNotFoundError("404", response=_response(404)),
        ),
        _wrapped(
            OSError("You are trying to access a gated repo."),
            GatedRepoError("403", response=_response(403)),
        ),
    ],
    ids=["dns", "refused", "timeout", "not-found", "gated"],
)
def test_other_network_failures_are_not_called_certificate_problems(error):
    assert certificate_failure(error) is None
    assert hub_error_from(error) is None  # the CLI keeps their own message


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_model):
    repos = {SDXL_REPO: tiny_model("sdxl"), QWEN_REPO: tiny_model("qwen2-vl")}
    hub, server = start_hub_server(tmp_path_factory.mktemp("hub"), repos)
    yield hub
    server.shutdown()
    server.server_close()


def test_the_presented_chain_is_read_without_trusting_it(hub):
    port = int(hub.url.rsplit(":", 1)[1])
    chain = presented_chain("127.0.0.1", port)
    assert [certificate.subject for certificate in chain] == ["CN=127.0.0.1", f"CN={CA_NAME},O=Tuner Tests"]
    assert chain[0].issuer == f"CN={CA_NAME},O=Tuner Tests"


def _tuner(
    hub, tmp_path: Path, *argv: str, timeout: float = 300, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TUNER_CA_BUNDLE"}
        and not name.lower().endswith("_proxy")
    }
    env.update(
        HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=hub.url, NO_PROXY="*", HF_HUB_DISABLE_TELEMETRY="1"
    )
    env.update(extra_env or {})
    return subprocess.run(
        [str(TUNER), *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _train(hub, tmp_path: Path, recipe: str, repo: str, *flags: str) -> subprocess.CompletedProcess:
    output = tmp_path / "run"
    argv = ["train", recipe, "--preset", "tiny-cpu", "--model", repo, "--data", "tiny"]
    return _tuner(hub, tmp_path, *argv, "--output", str(output), "--max-steps", "1", *flags)


RECIPES = [("sdxl-lora", SDXL_REPO), ("qwenvl-lora", QWEN_REPO)]


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "repo"), RECIPES, ids=["sdxl", "qwenvl"])
def test_with_the_ca_bundle_both_recipes_download_and_train(hub, tmp_path, recipe, repo):
    result = _train(hub, tmp_path, recipe, repo, "--ca-bundle", str(hub.certificates.ca_pem))
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("model.safetensors" in line and " 200" in line for line in hub.requests)
    config = yaml.safe_load((tmp_path / "run" / "tuner_config.yaml").read_text())
    assert config["hub"]["ca_bundle"] == str(hub.certificates.ca_pem)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "repo"), RECIPES, ids=["sdxl", "qwenvl"])
def test_without_the_ca_bundle_the_run_stops_at_the_first_handshake_and_names_the_fix(
    hub, tmp_path, recipe, repo
):
    hub.reset_counters()
    result = _train(hub, tmp_path, recipe, repo)
    assert result.returncode == 2
    error, hint = result.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: the TLS certificate of 127.0.0.1:") and "is not trusted" in error
    assert f"issued by 'CN={CA_NAME},O=Tuner Tests'" in error
    assert hint.startswith("hint:") and "--ca-bundle" in hint and "TUNER_CA_BUNDLE" in hint
    assert "docs/runtime.md" in hint
    # huggingface_hub's back-off would make 6 attempts (~25 s) per file. Now each request fails at its
    # first handshake (for Qwen-VL transformers swallows the error of one optional lookup and goes on),
    # and each failure opens one unverified connection to read the certificate for the message.
    failed = [entry for entry in hub.handshakes if entry != "ok"]
    assert 1 <= len(failed) <= 2 and hub.handshakes.count("ok") == len(failed)
    assert "Retrying" not in result.stderr


def _assert_fails_fast_naming_the_fix(hub, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    error, hint = result.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: the TLS certificate of 127.0.0.1:") and "is not trusted" in error
    assert f"issued by 'CN={CA_NAME},O=Tuner Tests'" in error
    assert hint.startswith("hint:") and "--ca-bundle" in hint and "TUNER_CA_BUNDLE" in hint
    # One failed handshake (no retry loop), one unverified connection to read the certificate.
    assert [entry != "ok" for entry in hub.handshakes] in ([True, False], [False, True])
    assert "Retrying" not in result.stderr


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_model, tmp_path_factory):
    return write_adapter(tiny_model("sdxl"), tmp_path_factory.mktemp("adapter") / "lora", seed=1)


# Commands without a run config (so without train's hub settings) that read the base from the hub, and
# what each writes.
def _hub_command(command: str, tmp_path: Path, adapter: Path) -> tuple[list[str], Path]:
    if command == "infer":
        out = tmp_path / "image.png"
        argv = ["infer", "sdxl", "--model", SDXL_REPO, "--prompt", "a red square", "--steps", "1"]
        return [*argv, "--size", "64x64", "--device", "cpu", "--out", str(out)], out
    if command == "merge":
        out = tmp_path / "merged"
        return ["merge", "--base", SDXL_REPO, "--adapter", str(adapter), "--output", str(out)], out
    out = tmp_path / "lora.safetensors"
    return ["convert", str(adapter), str(out), "--to", "kohya", "--base", SDXL_REPO], out


@pytest.mark.parametrize("command", ["infer", "merge", "convert"])
def test_infer_merge_and_convert_stop_at_the_first_handshake_without_the_bundle(
    hub, tmp_path, sdxl_adapter, command
):
    hub.reset_counters()
    argv, _ = _hub_command(command, tmp_path, sdxl_adapter)
    _assert_fails_fast_naming_the_fix(hub, _tuner(hub, tmp_path, *argv))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["infer", "merge", "convert"])
def test_infer_merge_and_convert_download_with_the_bundle(hub, tmp_path, sdxl_adapter, command):
    argv, out = _hub_command(command, tmp_path, sdxl_adapter)
    if command == "convert":  # the environment variable stands in for the flag
        result = _tuner(hub, tmp_path, *argv, extra_env={"TUNER_CA_BUNDLE": str(hub.certificates.ca_pem)})
    else:
        result = _tuner(hub, tmp_path, *argv, "--ca-bundle", str(hub.certificates.ca_pem))
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.exists()


@pytest.mark.slow
def test_insecure_mode_trains_warns_and_is_recorded(hub, tmp_path):
    result = _train(hub, tmp_path, "qwenvl-lora", QWEN_REPO, "--insecure-skip-tls-verify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "verification is OFF" in result.stderr
    config = yaml.safe_load((tmp_path / "run" / "tuner_config.yaml").read_text())
    assert config["hub"]["insecure_skip_tls_verify"] is True


def _check_hub(hub, tmp_path: Path, *flags: str) -> tuple[int, dict]:
    result = _tuner(hub, tmp_path, "env", "--check-hub", "--json", "--device", "cpu", *flags, timeout=120)
    return result.returncode, json.loads(result.stdout)["hub_check"]


def test_check_hub_without_the_bundle_shows_the_untrusted_chain_and_fails(hub, tmp_path):
    code, check = _check_hub(hub, tmp_path, "--model", QWEN_REPO)
    assert code == 1 and not check["ok"]
    assert check["tls_verified"] is False and "certificate not trusted" in check["tls_error"]
    assert [certificate["issuer"] for certificate in check["chain"]] == [f"CN={CA_NAME},O=Tuner Tests"] * 2
    assert check["proxy"] is None and "--ca-bundle" in check["hint"]
    assert not check["fetch"]["ok"] and "is not trusted" in check["fetch"]["error"]


def test_check_hub_with_the_bundle_verifies_and_fetches_a_config(hub, tmp_path):
    bundle = str(hub.certificates.ca_pem)
    code, check = _check_hub(hub, tmp_path, "--ca-bundle", bundle, "--model", SDXL_REPO)
    assert code == 0 and check["ok"] and check["tls_verified"]
    assert check["trust_store"] == f"SSL_CERT_FILE {bundle}"
    # a diffusers pipeline has model_index.json where a transformers model has config.json
    assert check["fetch"]["url"].endswith(f"/{SDXL_REPO}/resolve/main/model_index.json")
    assert check["fetch"]["status"] == 200


def test_check_hub_in_insecure_mode_fetches_and_still_reports_the_untrusted_certificate(hub, tmp_path):
    code, check = _check_hub(hub, tmp_path, "--insecure-skip-tls-verify")
    assert code == 0 and check["ok"] and check["insecure_skip_tls_verify"]
    assert check["tls_verified"] is False
    assert check["fetch"]["url"].endswith("/api/models?limit=1") and check["fetch"]["status"] == 200


def test_check_hub_names_the_proxy_in_effect_without_its_password(hub, tmp_path):
    # A proxy nothing listens on, on this machine: the check names it (redacted) and fails to connect.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    proxy_env = {"HTTPS_PROXY": f"http://user:secret@127.0.0.1:{port}", "NO_PROXY": ""}
    argv = ("env", "--check-hub", "--json", "--device", "cpu")
    result = _tuner(hub, tmp_path, *argv, timeout=120, extra_env=proxy_env)
    check = json.loads(result.stdout)["hub_check"]
    assert result.returncode == 1 and "secret" not in result.stdout
    assert check["proxy"] == f"http://***@127.0.0.1:{port}"
    assert check["proxy_variables"]["HTTPS_PROXY"] == check["proxy"]
    assert check["tls_verified"] is False and check["tls_error"].startswith("cannot connect")
