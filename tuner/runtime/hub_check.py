"""`tuner env --check-hub`: can this machine reach the model hub, and does it trust what it finds there?

The first thing to run on a new cluster image (beside `tuner selftest`): it connects to the configured
endpoint with the trust store the downloads will use, shows the certificates the server presented
(read without trusting them), the proxy in effect, and fetches one small file with the same client
the downloads use.
"""

from __future__ import annotations

import os
import ssl
from typing import Any
from urllib.parse import urlsplit

from tuner.errors import HubError
from tuner.runtime.hub import CERTIFICATE_HINT, DEFAULT_ENDPOINT
from tuner.runtime.report import hub_settings_in_effect, redact_proxy
from tuner.runtime.tls import (
    PROBE_TIMEOUT_S,
    hub_trust_store,
    open_tls,
    presented_chain,
    proxy_for,
    requests_trust_store,
)

DEFAULT_MODELSCOPE_DOMAIN = "www.modelscope.cn"


def hub_endpoint(source: str) -> str:
    """The endpoint downloads from `source` go to: HF_ENDPOINT, or ModelScope's MODELSCOPE_DOMAIN."""
    if source == "modelscope":
        # modelscope builds its URLs as "https://" + MODELSCOPE_DOMAIN.
        domain = os.environ.get("MODELSCOPE_DOMAIN") or DEFAULT_MODELSCOPE_DOMAIN
        return (domain if "://" in domain else f"https://{domain}").rstrip("/")
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _small_file_urls(source: str, endpoint: str, model: str | None) -> list[str]:
    """Where to fetch one small file: the model's config.json (a diffusers pipeline has model_index.json
    instead), or the API root without a model."""
    if not model:
        return [f"{endpoint}/" if source == "modelscope" else f"{endpoint}/api/models?limit=1"]
    if source == "modelscope":
        template = f"{endpoint}/api/v1/models/{model}/repo?Revision=master&FilePath={{}}"
    else:
        template = f"{endpoint}/{model}/resolve/main/{{}}"
    return [template.format(name) for name in ("config.json", "model_index.json")]


def check_hub(
    source: str = "huggingface", model: str | None = None, insecure: bool = False
) -> dict[str, Any]:
    """Everything `--check-hub` prints, as JSON-ready data. `ok` is True when a download would work."""
    endpoint = hub_endpoint(source)
    parts = urlsplit(endpoint)
    host, port = parts.hostname or endpoint, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = proxy_for(endpoint)
    trust, context = hub_trust_store() if source != "modelscope" else requests_trust_store()
    report: dict[str, Any] = {
        "source": source,
        "endpoint": endpoint,
        "proxy": redact_proxy(proxy) if proxy else None,
        "proxy_variables": hub_settings_in_effect(os.environ)["proxies"],
        "trust_store": trust,
        "insecure_skip_tls_verify": insecure,
        "tls_verified": None,
        "tls_error": None,
        "chain": [],
        "chain_error": None,
    }
    if parts.scheme == "https":
        report["tls_verified"], report["tls_error"] = _verify(host, port, context, proxy)
        try:
            report["chain"] = [info.as_dict() for info in presented_chain(host, port, proxy)]
        except ImportError:
            report["chain_error"] = "install the cryptography package to read the certificates"
        except OSError as error:
            report["chain_error"] = str(error)
    for url in _small_file_urls(source, endpoint, model):
        report["fetch"] = _fetch(source, url, insecure)
        if report["fetch"]["status"] != 404:
            break
    tls_ok = report["tls_verified"] is not False or insecure
    report["ok"] = tls_ok and report["fetch"]["ok"]
    report["hint"] = None if report["ok"] else _hint(report)
    return report


def _verify(host: str, port: int, context: ssl.SSLContext, proxy: str | None) -> tuple[bool, str | None]:
    try:
        with open_tls(host, port, context, proxy, timeout=PROBE_TIMEOUT_S):
            return True, None
    except ssl.SSLCertVerificationError as error:
        return False, f"certificate not trusted: {error.verify_message}"
    except OSError as error:
        return False, f"cannot connect: {error}"


def _fetch(source: str, url: str, insecure: bool) -> dict[str, Any]:
    """GET `url` with the client the downloads use: huggingface_hub's session, or requests for ModelScope."""
    result: dict[str, Any] = {"url": url, "status": None, "ok": False, "error": None}
    try:
        if source == "modelscope":
            import requests

            status = requests.get(url, timeout=PROBE_TIMEOUT_S, verify=not insecure).status_code
        else:
            from huggingface_hub import get_session

            status = get_session().get(url, timeout=PROBE_TIMEOUT_S).status_code
    except HubError as error:  # the hub client's own certificate diagnosis
        result["error"] = error.message
    except Exception as error:  # any network failure is a result to report, not a crash
        result["error"] = f"{type(error).__name__}: {error}"
    else:
        result.update(status=status, ok=200 <= status < 400)
        if not result["ok"]:
            result["error"] = f"HTTP {status}"
    return result


def _hint(report: dict[str, Any]) -> str:
    if report["tls_verified"] is False and "not trusted" in (report["tls_error"] or ""):
        return CERTIFICATE_HINT
    if report["tls_verified"] is False:
        return "check the endpoint, DNS and the proxy variables (HTTPS_PROXY, NO_PROXY)"
    return "the server answered, but not with the file: check the endpoint URL and the model ID"


def format_hub_check(report: dict[str, Any]) -> str:
    """Aligned lines for humans, in the order an operator reads them."""
    rows: list[tuple[str, str]] = [("hub", f"{report['source']} {report['endpoint']}")]
    rows.append(("proxy", report["proxy"] or "none (direct connection)"))
    for name, value in report["proxy_variables"].items():
        rows.append((f"  {name}", value))
    rows.append(("trust store", report["trust_store"]))
    if report["tls_verified"] is None:
        tls = "not used (http endpoint)"
    elif report["tls_verified"]:
        tls = "ok"
    else:
        tls = f"FAIL: {report['tls_error']}"
    if report["insecure_skip_tls_verify"]:
        tls = f"OFF (--insecure-skip-tls-verify); with verification: {tls}"
    rows.append(("TLS verification", tls))
    for index, certificate in enumerate(report["chain"]):
        rows.append(
            (
                f"certificate {index}",
                f"{certificate['subject']} issued by {certificate['issuer']}, "
                f"expires {certificate['not_after']}, sha256 {certificate['sha256'][:16]}...",
            )
        )
    if report["chain_error"]:
        rows.append(("certificates", f"not read: {report['chain_error']}"))
    fetch = report["fetch"]
    rows.append(("fetch", f"{'ok' if fetch['ok'] else 'FAIL'}: GET {fetch['url']}" + _fetch_outcome(fetch)))
    rows.append(("result", "ok" if report["ok"] else f"FAIL -> {report['hint']}"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def _fetch_outcome(fetch: dict[str, Any]) -> str:
    if fetch["status"] is not None:
        return f" -> HTTP {fetch['status']}"
    return f" -> {fetch['error']}"
