"""TLS to a model hub: recognising certificate failures, and what the server actually presented.

A TLS-inspecting proxy (or a mirror with a private CA) presents a certificate no trust store on the
machine knows. The libraries bury that under several layers of wrapping (httpx2 `ConnectError`,
requests `SSLError` around urllib3 `MaxRetryError`, transformers' "We couldn't connect ...").
`certificate_failure` digs it out; `presented_chain` fetches the certificates the server sent,
without trusting them, so the error can name the issuer the user has to trust.
"""

from __future__ import annotations

import _ssl
import base64
import os
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

VERIFY_FAILED_MARKER = "CERTIFICATE_VERIFY_FAILED"
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CertificateFailure:
    """A certificate-verification failure found in an exception chain."""

    reason: str  # OpenSSL's words, e.g. "unable to get local issuer certificate"
    url: str | None  # the request that failed, where a wrapper kept it


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    issuer: str
    not_after: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """The error and everything it wraps: __cause__, __context__, exceptions among its args, and the
    `reason` urllib3's MaxRetryError keeps the real error in."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:  # chains can be cyclic
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending.extend(item for item in linked if isinstance(item, BaseException))


def _request_url(error: BaseException) -> str | None:
    # httpx2 and requests errors carry the request; reading httpx2's raises when it was never set.
    try:
        request = getattr(error, "request", None)
    except RuntimeError:
        return None
    url = getattr(request, "url", None)
    return str(url) if url else getattr(error, "url", None)


def certificate_failure(error: BaseException) -> CertificateFailure | None:
    """The certificate-verification failure inside `error`, whatever wraps it; None for any other error."""
    typed: str | None = None
    text: str | None = None
    url: str | None = None
    for item in exception_chain(error):
        url = url or _request_url(item)
        if isinstance(item, ssl.SSLCertVerificationError):
            typed = typed or item.verify_message or str(item)
        elif text is None and VERIFY_FAILED_MARKER in str(item):
            # A wrapper that kept only the text (e.g. a message-only re-raise); OpenSSL's reason follows.
            message = str(item)
            text = message.split("certificate verify failed:", 1)[-1].split("(_ssl.c", 1)[0].strip()
    reason = typed or text
    return CertificateFailure(reason, url) if reason is not None else None


def proxy_for(url: str, env: Mapping[str, str] | None = None) -> str | None:
    """The proxy URL the http clients would use for `url` from the environment (None: direct)."""
    env = os.environ if env is None else env
    parts = urlsplit(url)
    proxies = {
        name.lower()[: -len("_proxy")]: value
        for name, value in env.items()
        if name.lower().endswith("_proxy") and value
    }
    no_proxy = proxies.pop("no", "")
    if parts.hostname and no_proxy and _bypassed(parts.hostname, no_proxy):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


def _bypassed(host: str, no_proxy: str) -> bool:
    # curl's and httpx's rule: "*" bypasses everything; an entry matches the host and its subdomains.
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        entry = entry.split(":", 1)[0].lstrip(".") if entry.count(":") == 1 else entry.lstrip(".")
        if entry == "*" or (entry and (host.lower() == entry or host.lower().endswith("." + entry))):
            return True
    return False


def open_tls(
    host: str, port: int, context: ssl.SSLContext, proxy: str | None, timeout: float = PROBE_TIMEOUT_S
) -> ssl.SSLSocket:
    """A TLS connection to host:port with `context`, through an http:// proxy's CONNECT where given."""
    if proxy is None:
        sock = socket.create_connection((host, port), timeout=timeout)
    else:
        sock = _connect_tunnel(host, port, proxy, timeout)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def _connect_tunnel(host: str, port: int, proxy: str, timeout: float) -> socket.socket:
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme != "http" or not parts.hostname:
        raise OSError(f"cannot tunnel through proxy {parts.scheme}://{parts.hostname} (only http:// proxies)")
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
    request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if parts.username:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        request += f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}\r\n"
    sock.sendall((request + "\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        if not chunk:
            break
        response += chunk
    status = response.split(b"\r\n", 1)[0].decode(errors="replace")
    if " 200" not in status:
        sock.close()
        raise OSError(f"proxy {parts.hostname}:{parts.port or 80} refused CONNECT {host}:{port}: {status}")
    return sock


def presented_chain(host: str, port: int, proxy: str | None = None) -> list[CertificateInfo]:
    """The certificates the server sends, leaf first, fetched with verification off and only read.

    Raises OSError when the server cannot be reached, ImportError without the `cryptography` package.
    """
    from cryptography import x509  # imported first: without it there is nothing to read the chain with

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with open_tls(host, port, context, proxy) as tls:
        ders = _unverified_chain(tls)
    return [_describe(x509.load_der_x509_certificate(der)) for der in ders]


def _unverified_chain(tls: ssl.SSLSocket) -> list[bytes]:
    public = getattr(tls, "get_unverified_chain", None)  # Python >= 3.13
    if public is not None:
        return list(public())
    # Python 3.10-3.12 have the same call on the private _ssl object only; without it, the leaf.
    private = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    if private is not None:
        return [certificate.public_bytes(_ssl.ENCODING_DER) for certificate in private() or []]
    leaf = tls.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _describe(certificate) -> CertificateInfo:  # a cryptography x509.Certificate
    from cryptography.hazmat.primitives import hashes

    return CertificateInfo(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        not_after=certificate.not_valid_after_utc.date().isoformat(),
        sha256=certificate.fingerprint(hashes.SHA256()).hex(),
    )


def hub_trust_store() -> tuple[str, ssl.SSLContext]:
    """(description, context) of the trust store huggingface_hub's httpx2 client verifies with.

    httpcore2 2.16 uses SSL_CERT_FILE, else SSL_CERT_DIR, else OpenSSL's compiled-in system paths (not
    certifi). tuner's --ca-bundle sets SSL_CERT_FILE.
    """
    import httpcore2

    if os.environ.get("SSL_CERT_FILE"):
        where = f"SSL_CERT_FILE {os.environ['SSL_CERT_FILE']}"
    elif os.environ.get("SSL_CERT_DIR"):
        where = f"SSL_CERT_DIR {os.environ['SSL_CERT_DIR']}"
    else:
        paths = ssl.get_default_verify_paths()
        where = f"system ({paths.cafile or paths.capath or 'OpenSSL default paths'})"
    return where, httpcore2.default_ssl_context()


def requests_trust_store() -> tuple[str, ssl.SSLContext]:
    """(description, context) of the trust store requests (and so ModelScope) verifies with: its
    REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE, else certifi's bundle."""
    import certifi

    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if os.environ.get(name):
            path = os.environ[name]
            break
    else:
        name, path = "certifi", certifi.where()
    if Path(path).is_dir():
        return f"{name} {path}", ssl.create_default_context(capath=path)
    return f"{name} {path}", ssl.create_default_context(cafile=path)
