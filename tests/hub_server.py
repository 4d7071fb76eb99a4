"""A local HTTPS stand-in for the model hub, behind a certificate from a throwaway private CA.

It plays the part of a TLS-inspecting proxy's certificate (signed by a CA no trust store knows) in
front of the routes huggingface_hub 2.4 uses: `HEAD/GET /{repo}/resolve/{revision}/{file}` with the
`X-Repo-Commit`, `ETag` and `Content-Length` headers `get_hf_file_metadata` reads, and
`/api/models/{repo}[/revision/{revision}]` and `/api/models/{repo}/tree/{revision}[/{path}]` for
model info and listings. Errors carry the `X-Error-Code` header `hf_raise_for_status` maps to its
exceptions. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_NAME = "Tuner Test Intercepting Proxy CA"
SERVER_NAME = "127.0.0.1"


@dataclass
class Certificates:
    ca_pem: Path  # the bundle a user passes to --ca-bundle
    server_cert: Path  # the server's certificate followed by the CA's (the chain it presents)
    server_key: Path


def make_certificates(folder: Path) -> Certificates:
    """A private CA and a server certificate for 127.0.0.1/localhost signed by it, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tuner Tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(SERVER_NAME)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    certificates = Certificates(folder / "ca.pem", folder / "server-chain.pem", folder / "server-key.pem")
    certificates.ca_pem.write_bytes(ca_pem)
    certificates.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM) + ca_pem)
    certificates.server_key.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificates


@dataclass
class HubServer:
    """A running server: its URL, the files it serves and what it has seen."""

    url: str
    certificates: Certificates
    repos: dict[str, Path]
    handshakes: list[str] = field(default_factory=list)  # "ok" or the server-side handshake error
    requests: list[str] = field(default_factory=list)  # "METHOD path STATUS"

    def reset_counters(self) -> None:
        self.handshakes.clear()
        self.requests.clear()


def _commit(repo: str) -> str:
    return hashlib.sha1(repo.encode()).hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the hub; every response carries Content-Length
    hub: HubServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            self._api(parts[2:], body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), body)
        else:
            self._send(404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "not found"}', body)

    def _resolve(self, repo: str, revision: str, filename: str, body: bool) -> None:
        folder = self.hub.repos.get(repo)
        if folder is None:
            self._send(404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "repo not found"}', body)
            return
        commit = {"X-Repo-Commit": _commit(repo)}
        file = folder / filename
        if not file.is_file():
            self._send(404, {**commit, "X-Error-Code": "EntryNotFound"}, b'{"error": "no entry"}', body)
            return
        content = file.read_bytes()
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        self._send(200, {**commit, "ETag": etag, "Content-Type": "application/octet-stream"}, content, body)

    def _api(self, parts: list[str], body: bool) -> None:
        if not parts:  # the model listing, which `tuner env --check-hub` fetches without --model
            self._send(200, {"Content-Type": "application/json"}, b"[]", body)
            return
        repo = "/".join(parts[:2])
        folder = self.hub.repos.get(repo)
        if folder is None:
            self._send(404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "repo not found"}', body)
            return
        if len(parts) >= 4 and parts[2] == "tree":
            prefix = "/".join(parts[4:])
            entries = [
                {"type": "file", "path": name, "size": (folder / name).stat().st_size, "oid": _commit(name)}
                for name in _files(folder)
                if not prefix or name.startswith(prefix + "/")
            ]
            if prefix and not entries:
                self._send(404, {"X-Error-Code": "EntryNotFound"}, b'{"error": "no entry"}', body)
                return
            self._send(200, {"Content-Type": "application/json"}, json.dumps(entries).encode(), body)
            return
        info = {
            "id": repo,
            "modelId": repo,
            "sha": _commit(repo),
            "private": False,
            "gated": False,
            "siblings": [{"rfilename": name} for name in _files(folder)],
        }
        self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)

    def _send(self, status: int, headers: dict[str, str], content: bytes, body: bool) -> None:
        self.hub.requests.append(f"{self.command} {self.path} {status}")
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if body:
            self.wfile.write(content)


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True
    context: ssl.SSLContext
    hub: HubServer

    def finish_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        # The handshake runs in the request's thread, so a client that rejects the certificate
        # (or never finishes) cannot stall the accept loop; each attempt is recorded.
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as error:
            self.hub.handshakes.append(f"failed: {error}")
            return
        self.hub.handshakes.append("ok")
        super().finish_request(tls, client_address)


def start_hub_server(folder: Path, repos: dict[str, Path]) -> tuple[HubServer, _TlsServer]:
    """Start serving `repos` ({"org/name": model folder}) on an ephemeral 127.0.0.1 port."""
    certificates = make_certificates(folder)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.server_cert, certificates.server_key)
    server = _TlsServer((SERVER_NAME, 0), _Handler)
    hub = HubServer(f"https://{SERVER_NAME}:{server.server_address[1]}", certificates, repos)
    server.context = context
    server.hub = hub
    server.RequestHandlerClass = type("HubHandler", (_Handler,), {"hub": hub})
    threading.Thread(target=server.serve_forever, name="hub-server", daemon=True).start()
    return hub, server
