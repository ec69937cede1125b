"""TLS for Kinema's gRPC: a server's certificate (and, for mTLS, the CA its clients' certificates must chain to), and
what a client trusts and presents. PEM files only, as cert-manager writes them into a Secret (tls.crt, tls.key,
ca.crt). The settings (`kinema.rpc.settings`, docs/deploy.md#tls):

- KINEMA_TLS_CERT_FILE + KINEMA_TLS_KEY_FILE: the serving port speaks TLS with this certificate chain and key; with
  KINEMA_TLS_CLIENT_CA_FILE as well, every client must present a certificate that CA signed (mTLS), else its
  handshake fails (the client sees UNAVAILABLE).
- KINEMA_HEALTH_PORT: a plaintext port serving grpc.health.v1 only, for probes that cannot speak TLS (Kubernetes'
  native gRPC probe). It answers SERVING / NOT_SERVING and nothing else.
- KINEMA_INTERNAL_TLS_CA_FILE (+ KINEMA_INTERNAL_TLS_CERT_FILE + KINEMA_INTERNAL_TLS_KEY_FILE): what this process
  trusts (and presents) when it calls Kinema's internal gRPC servers: the orchestrator and its workers calling the
  model services, a model service calling Triton.

Files are read, and checked to parse and to match (a key of another certificate), when a server or channel is made:
a bad one stops the process at start with one line naming the setting, never a half-secured server.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from kinema.errors import InvalidInput
from kinema.rpc.settings import ENV_VARS, ServiceSettings


def read_pem(path: str | Path, setting: str) -> bytes:
    """The bytes of a PEM file; InvalidInput naming `setting` (a variable or option) when it is unreadable or no PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidInput(f"{setting}={path}: cannot read it: {e.strerror or e}", reason="TLS_FILE") from None
    if b"-----BEGIN " not in data:
        raise InvalidInput(f"{setting}={path}: not a PEM file (no '-----BEGIN' line)", reason="TLS_FILE")
    return data


def _check_pair(cert: str | Path, key: str | Path, cert_setting: str, key_setting: str) -> None:
    """The certificate chain parses and `key` is its private key (OpenSSL's own checks, through the stdlib)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A passphrase-protected key would make OpenSSL ask on the terminal; gRPC cannot use one anyway.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        raise InvalidInput(f"{cert_setting}={cert} and {key_setting}={key} are not a certificate and its unencrypted "
                           f"private key: {e.reason or e}", reason="TLS_FILE") from None  # fmt: skip


def _check_ca(ca: str | Path, setting: str) -> None:
    try:
        ssl.create_default_context(cafile=str(ca))
    except ssl.SSLError as e:
        raise InvalidInput(f"{setting}={ca}: not a PEM CA certificate: {e.reason or e}", reason="TLS_FILE") from None


def _pair(cert: str, key: str, cert_setting: str, key_setting: str) -> tuple[bytes, bytes]:
    """(key, chain) PEM bytes, read and checked."""
    chain, private = read_pem(cert, cert_setting), read_pem(key, key_setting)
    _check_pair(cert, key, cert_setting, key_setting)
    return private, chain


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """The serving port's credentials: None (plaintext) without a certificate; TLS; mTLS with a client CA."""
    if not settings.tls_cert_file:
        return None
    pair = _pair(settings.tls_cert_file, settings.tls_key_file, ENV_VARS["tls_cert_file"], ENV_VARS["tls_key_file"])
    if not settings.tls_client_ca_file:
        return grpc.ssl_server_credentials([pair])
    ca = read_pem(settings.tls_client_ca_file, ENV_VARS["tls_client_ca_file"])
    _check_ca(settings.tls_client_ca_file, ENV_VARS["tls_client_ca_file"])
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=True)


def channel_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
    *,
    settings: tuple[str, str, str] = ("ca_file", "cert_file", "key_file"),
) -> grpc.ChannelCredentials:
    """TLS channel credentials: trust `ca_file` (None: the public roots gRPC ships, or the file named by
    GRPC_DEFAULT_SSL_ROOTS_FILE_PATH), and present `cert_file` + `key_file` where the server asks for a client
    certificate (mTLS). `settings` names the three in error messages (variables or CLI options)."""
    if (cert_file is None) != (key_file is None):
        raise InvalidInput(f"{settings[1]} and {settings[2]} go together: a client certificate needs its key",
                           reason="TLS_FILE")  # fmt: skip
    ca = None
    if ca_file is not None:
        ca = read_pem(ca_file, settings[0])
        _check_ca(ca_file, settings[0])
    if cert_file is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    private, chain = _pair(str(cert_file), str(key_file), settings[1], settings[2])
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=private, certificate_chain=chain)


def internal_credentials(settings: ServiceSettings) -> grpc.ChannelCredentials | None:
    """What this process's calls to Kinema's internal servers present: None (plaintext) without an internal CA."""
    if not settings.internal_tls_ca_file:
        return None
    names = (ENV_VARS["internal_tls_ca_file"], ENV_VARS["internal_tls_cert_file"], ENV_VARS["internal_tls_key_file"])
    return channel_credentials(settings.internal_tls_ca_file, settings.internal_tls_cert_file or None,
                               settings.internal_tls_key_file or None, settings=names)  # fmt: skip


__all__ = ["channel_credentials", "internal_credentials", "read_pem", "server_credentials"]
