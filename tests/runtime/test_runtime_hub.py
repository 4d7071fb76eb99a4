"""Hub endpoint, CA bundle, offline mode, the insecure escape hatch, model sources. No network."""

from __future__ import annotations

import os
import ssl
import sys

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.utils import _http

from tuner.errors import ConfigError, ModelError
from tuner.runtime import apply_hub_settings, resolve_model_source
from tuner.runtime.hub import CA_BUNDLE_VARIABLES, OFFLINE_VARIABLES

PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


@pytest.fixture
def pem_file(tmp_path):
    path = tmp_path / "company-ca.pem"
    path.write_text(PEM)
    return path


@pytest.fixture
def restore_hub_constants(monkeypatch):
    """apply_hub_settings patches huggingface_hub's import-time constants; put them back afterwards."""
    for name in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_URL_HOSTS", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.setattr(constants, name, getattr(constants, name))


def test_ca_bundle_points_all_three_clients_at_the_file(pem_file):
    env: dict[str, str] = {}
    assert apply_hub_settings(ca_bundle=str(pem_file), env=env) == []
    assert {name: env[name] for name in CA_BUNDLE_VARIABLES} == dict.fromkeys(
        CA_BUNDLE_VARIABLES, str(pem_file)
    )


def test_ca_bundle_falls_back_to_tuner_ca_bundle(pem_file):
    env = {"TUNER_CA_BUNDLE": str(pem_file)}
    apply_hub_settings(env=env)
    assert env["SSL_CERT_FILE"] == str(pem_file)


def test_missing_ca_bundle_names_the_path(tmp_path):
    missing = tmp_path / "nope.pem"
    env: dict[str, str] = {}
    with pytest.raises(ConfigError, match=str(missing)):
        apply_hub_settings(ca_bundle=str(missing), env=env)
    assert env == {}


def test_non_pem_ca_bundle_is_rejected(tmp_path):
    der = tmp_path / "company-ca.cer"
    der.write_bytes(b"0\x82\x03\x1a0\x82\x02\x02\xa0\x03\x02\x01\x02")
    env: dict[str, str] = {}
    with pytest.raises(ConfigError, match="no PEM certificate") as raised:
        apply_hub_settings(ca_bundle=str(der), env=env)
    assert str(der) in raised.value.message and "openssl" in raised.value.hint
    assert env == {}


@pytest.mark.parametrize("variable", ["CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE"])
def test_empty_ca_variable_warns_instead_of_pretending_to_disable_checks(variable):
    env = {variable: ""}
    warnings = apply_hub_settings(env=env)
    assert len(warnings) == 1 and variable in warnings[0] and "--ca-bundle" in warnings[0]
    assert env == {variable: ""}


def test_endpoint_sets_hf_endpoint_and_patches_an_already_imported_hub(restore_hub_constants):
    env: dict[str, str] = {}
    apply_hub_settings(endpoint="https://mirror.example.com/", env=env)
    assert env["HF_ENDPOINT"] == "https://mirror.example.com"
    # huggingface_hub is already imported here, so its import-time copy must follow.
    assert constants.ENDPOINT == "https://mirror.example.com"
    assert huggingface_hub.hf_hub_url("org/model", "config.json").startswith("https://mirror.example.com/")
    assert "mirror.example.com" in constants.HF_URL_HOSTS


def test_endpoint_must_be_a_url():
    with pytest.raises(ConfigError, match="not an http"):
        apply_hub_settings(endpoint="mirror.example.com", env={})


def test_offline_sets_the_three_offline_variables(monkeypatch, restore_hub_constants):
    import datasets.config

    # tests/conftest.py forces offline mode for the session; start from "online" to see the change.
    constants.HF_HUB_OFFLINE = False
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    env: dict[str, str] = {}
    apply_hub_settings(offline=True, env=env)
    assert env == dict.fromkeys(OFFLINE_VARIABLES, "1")
    assert constants.is_offline_mode()
    assert datasets.config.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE


def test_no_setting_ever_writes_an_empty_ca_variable(monkeypatch, pem_file, restore_hub_constants):
    # An empty CURL_CA_BUNDLE used to mean "verify nothing" to old requests; never produce one.
    for name in (*CA_BUNDLE_VARIABLES, "TUNER_CA_BUNDLE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name in OFFLINE_VARIABLES:  # registered so monkeypatch restores them after os.environ is written
        monkeypatch.setenv(name, os.environ.get(name, "0"))
    for settings in ({}, {"ca_bundle": str(pem_file)}, {"offline": True}, {"endpoint": "https://m.example"}):
        env: dict[str, str] = {}
        apply_hub_settings(**settings, env=env)
        apply_hub_settings(**settings)
        assert all(value != "" for value in env.values())
        assert all(os.environ.get(name) != "" for name in CA_BUNDLE_VARIABLES)


@pytest.fixture
def restore_client_factories():
    yield
    huggingface_hub.set_client_factory(_http.default_client_factory)
    huggingface_hub.set_async_client_factory(_http.default_async_client_factory)


def test_insecure_turns_verification_off_for_hub_clients_only(restore_client_factories, pem_file):
    before = {name: os.environ.get(name) for name in CA_BUNDLE_VARIABLES}
    env = {"SSL_CERT_FILE": str(pem_file)}
    warnings = apply_hub_settings(insecure_skip_tls_verify=True, env=env)
    assert any("verification is OFF" in warning for warning in warnings)
    assert env == {"SSL_CERT_FILE": str(pem_file)}
    assert {name: os.environ.get(name) for name in CA_BUNDLE_VARIABLES} == before

    client = huggingface_hub.get_session()
    # httpx2 keeps the SSL context on the connection pool; CERT_NONE is what verify=False builds.
    assert client._transport._pool._ssl_context.verify_mode == ssl.CERT_NONE
    # The hub's own request hook (offline refusal, request ids) survives the swap.
    assert _http.hf_request_event_hook in client.event_hooks["request"]
    async_client = huggingface_hub.get_async_session()
    assert async_client._transport._pool._ssl_context.verify_mode == ssl.CERT_NONE

    huggingface_hub.set_client_factory(_http.default_client_factory)
    assert huggingface_hub.get_session()._transport._pool._ssl_context.verify_mode == ssl.CERT_REQUIRED


def test_local_paths_resolve_to_themselves_and_missing_ones_fail(tmp_path):
    assert resolve_model_source(str(tmp_path), offline=True) == str(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_source("sdxl-base.safetensors")


def test_hub_ids_are_left_for_the_library_when_online():
    assert resolve_model_source("org/model") == "org/model"


def test_offline_model_missing_from_cache_names_model_and_download_hint(tmp_path, restore_hub_constants):
    constants.HF_HUB_CACHE = str(tmp_path)
    with pytest.raises(ModelError, match="org/never-downloaded") as raised:
        resolve_model_source("org/never-downloaded", offline=True)
    assert "hf download org/never-downloaded" in raised.value.hint


def test_offline_model_in_cache_resolves_to_its_snapshot(tmp_path, restore_hub_constants):
    constants.HF_HUB_CACHE = str(tmp_path)
    repo = tmp_path / "models--org--cached"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert resolve_model_source("org/cached", offline=True) == str(snapshot)


def test_modelscope_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope` raise ImportError
    with pytest.raises(ModelError, match="modelscope") as raised:
        resolve_model_source("qwen/Qwen2-VL-2B-Instruct", source="modelscope")
    assert "tuner[modelscope]" in raised.value.hint


def test_cache_dir_sets_where_downloads_go(tmp_path, restore_hub_constants):
    env: dict[str, str] = {}
    models = str(tmp_path / "models")
    apply_hub_settings(cache_dir=models, env=env)
    assert env["HF_HUB_CACHE"] == env["MODELSCOPE_CACHE"] == models
    cache = constants.HF_HUB_CACHE  # huggingface_hub is imported here; its downloads read this per call
    assert cache == models
