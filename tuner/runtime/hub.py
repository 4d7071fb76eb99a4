"""Hub settings (endpoint, CA bundle, offline, the insecure escape hatch) and where a model comes from."""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuner.errors import ConfigError, HubError, ModelError
from tuner.runtime.tls import (
    certificate_failure,
    exception_chain,
    hub_trust_store,
    presented_chain,
    proxy_for,
    requests_trust_store,
)

PEM_CERTIFICATE_MARKER = "-----BEGIN CERTIFICATE-----"
# httpx (huggingface_hub 2.x uses its fork httpx2) reads SSL_CERT_FILE; requests and curl-based tools
# read the other two. All three point at the same bundle so every client in the process agrees.
CA_BUNDLE_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
DEFAULT_ENDPOINT = "https://huggingface.co"
CERTIFICATE_HINT = (
    "pass the CA certificate of your proxy or mirror (PEM) with --ca-bundle FILE or TUNER_CA_BUNDLE=FILE; "
    "`tuner env --check-hub` shows the chain; see docs/runtime.md, 'TLS certificate errors'"
)
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
INSECURE_WARNING = (
    "TLS certificate verification is OFF for model hub downloads (--insecure-skip-tls-verify). "
    "Anyone between this machine and the hub can substitute the weights you download. "
    "Use --ca-bundle with your proxy's CA certificate instead."
)


def apply_hub_settings(
    endpoint: str | None = None,
    ca_bundle: str | None = None,
    offline: bool = False,
    insecure_skip_tls_verify: bool = False,
    env: MutableMapping[str, str] = os.environ,
    cache_dir: str | None = None,
) -> list[str]:
    """Apply hub settings to `env` (and to huggingface_hub if already imported); return warnings to print.

    Call it before huggingface_hub is imported where possible: huggingface_hub 2.4 reads
    HF_ENDPOINT and HF_HUB_OFFLINE into module constants at import time (and datasets copies the
    offline flag at its import), so when they are already imported their constants are patched too.
    """
    warnings: list[str] = []
    if endpoint is not None:
        _apply_endpoint(endpoint, env)
    if ca_bundle is None:
        ca_bundle = env.get("TUNER_CA_BUNDLE") or None
    if ca_bundle is not None:
        bundle = _checked_ca_bundle(ca_bundle)
        for name in CA_BUNDLE_VARIABLES:
            env[name] = str(bundle)
    else:
        blank = [name for name in ("CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE") if env.get(name) == ""]
        if blank:
            warnings.append(
                f"{' and '.join(blank)} set to an empty string does not disable certificate checks: "
                "requests >= 2.28 ignores it and huggingface_hub now uses httpx, which never read it. "
                "Point --ca-bundle (or TUNER_CA_BUNDLE) at your proxy's CA certificate instead."
            )
    if offline:
        for name in OFFLINE_VARIABLES:
            env[name] = "1"
        if "huggingface_hub.constants" in sys.modules:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = True
        if "datasets.config" in sys.modules:
            import datasets.config

            # datasets 5.2 keeps its own import-time copy of the flag.
            datasets.config.HF_HUB_OFFLINE = True
            datasets.config.HF_DATASETS_OFFLINE = True
    if cache_dir is not None:
        _apply_cache_dir(cache_dir, env)
    if insecure_skip_tls_verify:
        warnings.append(INSECURE_WARNING)
    # Last: it imports huggingface_hub, which must see the variables set above, and it closes the
    # shared client, whose SSL context (built once) would not see a new SSL_CERT_FILE.
    install_hub_client(verify=not insecure_skip_tls_verify)
    return warnings


def _apply_cache_dir(cache_dir: str, env: MutableMapping[str, str]) -> None:
    """`hub.cache_dir`: where downloaded models go (Hugging Face and ModelScope alike)."""
    folder = str(Path(cache_dir).expanduser())
    env["HF_HUB_CACHE"] = folder
    env["MODELSCOPE_CACHE"] = folder
    if "huggingface_hub.constants" in sys.modules:
        from huggingface_hub import constants

        # huggingface_hub 2.4 reads HF_HUB_CACHE into this constant at import; downloads read it per call.
        constants.HF_HUB_CACHE = folder


def _apply_endpoint(endpoint: str, env: MutableMapping[str, str]) -> None:
    endpoint = endpoint.rstrip("/")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"hub endpoint {endpoint!r} is not an http(s) URL",
            hint="e.g. --hf-endpoint https://hf-mirror.com",
        )
    env["HF_ENDPOINT"] = endpoint
    if "huggingface_hub.constants" not in sys.modules:
        return
    from huggingface_hub import constants

    # Already imported, so HF_ENDPOINT was read too early. These are the three constants
    # huggingface_hub 2.4 derives from it: the API base, the file download URL template, and the
    # hosts that may receive the auth header when a download redirects.
    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_URL_HOSTS = constants.HF_URL_HOSTS | {parts.hostname.lower()}


def _checked_ca_bundle(ca_bundle: str) -> Path:
    path = Path(ca_bundle).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(
            f"CA bundle {ca_bundle} does not exist or is not a file",
            hint="pass the PEM file with your proxy's or company's CA certificate(s) to --ca-bundle",
        )
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as error:
        raise ConfigError(
            f"CA bundle {ca_bundle} cannot be read: {error}", hint="check its permissions"
        ) from error
    if PEM_CERTIFICATE_MARKER not in text:
        raise ConfigError(
            f"CA bundle {ca_bundle} contains no PEM certificate ({PEM_CERTIFICATE_MARKER} block)",
            hint="convert a DER certificate with: openssl x509 -inform der -in cert.cer -out cert.pem",
        )
    return path


def install_hub_client(verify: bool = True) -> None:
    """Make huggingface_hub's HTTP clients stop at the first certificate failure (and, with
    `verify=False`, skip certificate checks); nothing else in the process is affected."""
    import httpx2
    from huggingface_hub import set_async_client_factory, set_client_factory
    from huggingface_hub.utils._http import default_async_client_factory, default_client_factory

    # huggingface_hub 2.4 retries a failed connection 5 times with back-off (~25 s) because httpx2
    # reports a certificate failure as a ConnectError, a NetworkError. Raising HubError instead,
    # which is none of the types its http_backoff retries, stops at once and names the fix.
    # Overriding send() (not the transport) keeps the proxy transports httpx2 mounts from the env.
    class FailFastClient(httpx2.Client):
        def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
            try:
                return super().send(request, **kwargs)
            except httpx2.ConnectError as error:
                hub_error = _hub_certificate_error(error, str(request.url))
                if hub_error is None:
                    raise
                raise hub_error from error

    class FailFastAsyncClient(httpx2.AsyncClient):
        async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
            try:
                return await super().send(request, **kwargs)
            except httpx2.ConnectError as error:
                hub_error = _hub_certificate_error(error, str(request.url))
                if hub_error is None:
                    raise
                raise hub_error from error

    # huggingface_hub 2.4 has no verify option; copying the default client's event hooks keeps what
    # they do (offline-mode refusal, request ids, error bodies).
    def client() -> httpx2.Client:
        with default_client_factory() as default:
            hooks = default.event_hooks
        return FailFastClient(event_hooks=hooks, follow_redirects=True, timeout=None, verify=verify)

    def async_client() -> httpx2.AsyncClient:
        hooks = default_async_client_factory().event_hooks
        return FailFastAsyncClient(event_hooks=hooks, follow_redirects=True, timeout=None, verify=verify)

    set_client_factory(client)
    set_async_client_factory(async_client)


def _hub_certificate_error(error: Exception, url: str) -> HubError | None:
    failure = certificate_failure(error)
    return None if failure is None else certificate_error(failure.reason, url, "hub")


def certificate_error(reason: str, url: str, client: str) -> HubError:
    """The error for a server certificate nothing trusts: the host, OpenSSL's reason, the certificate the
    server presented (fetched again without verification, to name its issuer) and the trust store used.

    `client` is "hub" (huggingface_hub's httpx2) or "requests" (ModelScope), whose trust stores differ.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or url, parts.port or 443
    trust, _ = hub_trust_store() if client == "hub" else requests_trust_store()
    try:
        chain = presented_chain(host, port, proxy_for(url))
    except ImportError:
        presented = "; install the cryptography package to see the certificate it presented"
    except OSError as error:
        presented = f"; its certificate could not be fetched again: {error}"
    else:
        presented = ""
        if chain:
            leaf, anchor = chain[0], chain[-1].issuer  # the CA the user has to trust
            presented = f"; it presented {leaf.subject!r} issued by {leaf.issuer!r}"
            if anchor != leaf.issuer:
                presented += f", a chain that ends at {anchor!r}"
    return HubError(
        f"the TLS certificate of {host}:{port} is not trusted ({reason}){presented}; checked against {trust}",
        hint=CERTIFICATE_HINT,
    )


def hub_error_from(error: BaseException) -> HubError | None:
    """The HubError for a certificate failure inside `error`, however a library wrapped it (transformers'
    "We couldn't connect", a ModelScope or datasets error, tuner's own ModelError); None for any other
    error, and for a HubError, which already says it all."""
    if isinstance(error, HubError):
        return None
    for item in exception_chain(error):
        if isinstance(item, HubError):  # raised by the hub client, then wrapped by a library
            return HubError(item.message, item.hint)
    failure = certificate_failure(error)
    if failure is None:
        return None
    url = failure.url or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    # requests and urllib3 (ModelScope) verify against certifi; huggingface_hub's httpx2 does not.
    via_requests = any(
        type(item).__module__.split(".")[0] in ("requests", "urllib3") for item in exception_chain(error)
    )
    return certificate_error(failure.reason, url, "requests" if via_requests else "hub")


def _looks_like_local_path(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", "./", "../", "~", ".\\")) or name_or_path.endswith(
        (".safetensors", ".ckpt")
    )


def resolve_model_source(
    name_or_path: str, source: str = "huggingface", offline: bool = False, revision: str | None = None
) -> str:
    """A local path for `name_or_path` where one is needed, else the hub ID for the library to download."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local)
    if _looks_like_local_path(name_or_path):
        raise ModelError(f"model path {name_or_path} does not exist", hint="check the path, or pass a hub ID")
    if source == "modelscope":
        return _modelscope_snapshot(name_or_path, offline, revision)
    if source != "huggingface":
        raise ConfigError(f"unknown hub source {source!r}", hint="choose huggingface or modelscope")
    if not offline:
        return name_or_path

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as error:
        raise ModelError(
            f"model {name_or_path} is not in the local Hugging Face cache and the hub is offline",
            hint=f"on a machine with access run `hf download {name_or_path}` and copy the cache "
            "(HF_HOME), or pass a local folder",
        ) from error


def _modelscope_snapshot(model_id: str, offline: bool, revision: str | None) -> str:
    try:
        from modelscope import snapshot_download
    except ImportError as error:
        raise ModelError(
            f"model {model_id} is to come from ModelScope but the modelscope package is not installed",
            hint="pip install 'tuner[modelscope]'",
        ) from error
    try:
        return str(snapshot_download(model_id, revision=revision, local_files_only=offline))
    # modelscope raises plain exceptions of several kinds for a missing or unreachable model.
    except Exception as error:
        raise ModelError(
            f"ModelScope could not provide model {model_id}: {error}",
            hint="check the model ID and network access, or download it and pass the local folder",
        ) from error
