"""One typed settings object per service process, built once from `KINEMA_*` environment variables."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kinema.repository import default_models_dir

BACKENDS = ("triton", "local")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class ServiceSettings:
    """Settings every Kinema gRPC service shares; a service adds its own fields by composition, not here."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (KinemaServer.port holds the bound one)
    metrics_port: int = 0  # 0: no /metrics endpoint
    max_message_bytes: int = 64 * 1024 * 1024  # receive and send
    max_batch: int = 16
    grace_seconds: float = 5.0
    backend: Literal["triton", "local"] = "triton"
    triton_url: str = "127.0.0.1:8001"
    models_dir: Path = field(default_factory=default_models_dir)
    log_level: str = "INFO"
    request_timeout_seconds: float = 300.0  # server-side bound on a request whose client set no deadline
    api_keys_file: str = ""  # "": no authentication; else the tenant + key-hash file of kinema.rpc.auth
    # Expensive calls (Generate, a model service's network calls) running at once; more are refused with
    # RESOURCE_EXHAUSTED and a retry hint (kinema.rpc.admission). Half the 64 worker threads a service has, so cheap
    # calls (GetJob, ListModels) always find a thread. 0: no limit.
    max_in_flight: int = 32
    # The longest prompt (and negative prompt), in characters, the text encoder service and the orchestrator take;
    # longer ones are refused with INVALID_ARGUMENT (reason PROMPT_TOO_LONG, `kinema.pipelines.text_to_image.
    # check_prompts`). Far beyond any encoder's token limit (where a prompt is cut and flagged), it bounds the text a
    # request may carry and the tokenizer's work on it.
    max_prompt_chars: int = 2000
    # TLS (kinema.rpc.tls, docs/deploy.md#tls); "" everywhere: plaintext. The serving port's certificate and key, and
    # the CA whose certificates clients must present (mTLS); a plaintext port serving health only, for probes.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    health_port: int = 0  # 0: none (health is on the serving port in any case)
    # What this process trusts, and presents, when it calls Kinema's internal servers (model services, Triton).
    internal_tls_ca_file: str = ""
    internal_tls_cert_file: str = ""
    internal_tls_key_file: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_dir", Path(self.models_dir))
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        for name, (check, must) in _CHECKS.items():
            if not check(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be {must}")
        _check_tls(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides: Any) -> ServiceSettings:
        """Defaults, then `KINEMA_*` variables from `environ`, then `overrides` (e.g. CLI flags).

        A malformed or out-of-range variable raises ValueError naming the variable.
        """
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            parse = _PARSERS.get(name, str)
            try:
                value = parse(raw.strip())
            except ValueError:
                raise ValueError(f"{var}={raw!r}: must be {_CHECKS[name][1]}") from None
            check, must = _CHECKS[name]
            if not check(value):
                raise ValueError(f"{var}={raw!r}: must be {must}")
            values[name] = value
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown ServiceSettings fields: {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)


ENV_VARS: dict[str, str] = {
    "host": "KINEMA_HOST",
    "port": "KINEMA_PORT",
    "metrics_port": "KINEMA_METRICS_PORT",
    "max_message_bytes": "KINEMA_MAX_MESSAGE_BYTES",
    "max_batch": "KINEMA_MAX_BATCH",
    "grace_seconds": "KINEMA_GRACE_SECONDS",
    "backend": "KINEMA_BACKEND",
    "triton_url": "KINEMA_TRITON_URL",
    "models_dir": "KINEMA_MODELS",
    "log_level": "KINEMA_LOG_LEVEL",
    "request_timeout_seconds": "KINEMA_REQUEST_TIMEOUT_SECONDS",
    "api_keys_file": "KINEMA_API_KEYS_FILE",
    "max_in_flight": "KINEMA_MAX_IN_FLIGHT",
    "max_prompt_chars": "KINEMA_MAX_PROMPT_CHARS",
    "tls_cert_file": "KINEMA_TLS_CERT_FILE",
    "tls_key_file": "KINEMA_TLS_KEY_FILE",
    "tls_client_ca_file": "KINEMA_TLS_CLIENT_CA_FILE",
    "health_port": "KINEMA_HEALTH_PORT",
    "internal_tls_ca_file": "KINEMA_INTERNAL_TLS_CA_FILE",
    "internal_tls_cert_file": "KINEMA_INTERNAL_TLS_CERT_FILE",
    "internal_tls_key_file": "KINEMA_INTERNAL_TLS_KEY_FILE",
}

_PARSERS: dict[str, Callable[[str], Any]] = {
    "port": int,
    "metrics_port": int,
    "max_message_bytes": int,
    "max_batch": int,
    "grace_seconds": float,
    "models_dir": Path,
    "log_level": str.upper,
    "request_timeout_seconds": float,
    "max_in_flight": int,
    "max_prompt_chars": int,
    "health_port": int,
}


def _finite_at_least(low: float, strict: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and v == v and v != float("inf")
        return ok and (v > low if strict else v >= low)

    return check


def _int_in(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _pem_path(v: Any) -> bool:
    return isinstance(v, str)  # read and checked by kinema.rpc.tls when the server or channel is made


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "host": (lambda v: isinstance(v, str) and v != "", "a non-empty host name or address"),
    "port": (_int_in(0, 65535), "an integer port in [0, 65535] (0: any free port)"),
    "metrics_port": (_int_in(0, 65535), "an integer port in [0, 65535] (0: off)"),
    "max_message_bytes": (_int_in(1024, 2**31 - 1), "an integer number of bytes in [1024, 2**31 - 1]"),
    "max_batch": (_int_in(1, 1 << 20), "an integer >= 1"),
    "grace_seconds": (_finite_at_least(0.0), "a finite number of seconds >= 0"),
    "backend": (lambda v: v in BACKENDS, f"one of {BACKENDS}"),
    "triton_url": (lambda v: isinstance(v, str) and v != "", "a non-empty host:port"),
    "models_dir": (lambda v: isinstance(v, Path), "a path"),
    "log_level": (lambda v: v in LOG_LEVELS, f"one of {LOG_LEVELS}"),
    "request_timeout_seconds": (_finite_at_least(0.0, strict=True), "a finite number of seconds > 0"),
    "api_keys_file": (lambda v: isinstance(v, str), "a path (empty: no authentication)"),
    "max_in_flight": (_int_in(0, 1 << 20), "an integer >= 0 (0: no limit)"),
    "max_prompt_chars": (_int_in(1, 1 << 20), "an integer number of characters in 1..1048576"),
    "tls_cert_file": (_pem_path, "a path to a PEM certificate chain (empty: plaintext)"),
    "tls_key_file": (_pem_path, "a path to a PEM private key (empty: plaintext)"),
    "tls_client_ca_file": (_pem_path, "a path to a PEM CA certificate (empty: no client certificates)"),
    "internal_tls_ca_file": (_pem_path, "a path to a PEM CA certificate (empty: plaintext)"),
    "internal_tls_cert_file": (_pem_path, "a path to a PEM certificate chain (empty: none)"),
    "internal_tls_key_file": (_pem_path, "a path to a PEM private key (empty: none)"),
    "health_port": (_int_in(0, 65535), "an integer port in [0, 65535] (0: none)"),
}


def _check_tls(s: ServiceSettings) -> None:
    """The TLS files come in the combinations kinema.rpc.tls uses (their contents are checked there, at start)."""
    var = ENV_VARS
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        raise ValueError(f"{var['tls_cert_file']} and {var['tls_key_file']} go together: a certificate needs its key")
    if s.tls_client_ca_file and not s.tls_cert_file:
        raise ValueError(f"{var['tls_client_ca_file']} needs {var['tls_cert_file']}: clients present certificates "
                         "over TLS only")  # fmt: skip
    if bool(s.internal_tls_cert_file) != bool(s.internal_tls_key_file):
        raise ValueError(f"{var['internal_tls_cert_file']} and {var['internal_tls_key_file']} go together")
    if s.internal_tls_cert_file and not s.internal_tls_ca_file:
        raise ValueError(f"{var['internal_tls_cert_file']} needs {var['internal_tls_ca_file']}, the CA the internal "
                         "servers' certificates are checked against")  # fmt: skip
    if s.health_port and s.health_port in (s.port, s.metrics_port):
        raise ValueError(f"{var['health_port']}={s.health_port}: must differ from the gRPC and metrics ports")
