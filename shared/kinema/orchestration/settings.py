"""The orchestrator's settings: the shared service settings plus its own, from `KINEMA_*` variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from kinema.rpc.settings import ServiceSettings
from kinema.storage.artifacts import ENV_ACCESS_KEY, ENV_SECRET_KEY, MAX_EXPIRY

# Orchestrator field -> environment variable (the S3 credentials are read by name, see `from_env`).
ENV_VARS: dict[str, str] = {
    "text_encoder_url": "KINEMA_TEXT_ENCODER_URL",
    "denoiser_url": "KINEMA_DENOISER_URL",
    "autoencoder_url": "KINEMA_AUTOENCODER_URL",
    "artifacts": "KINEMA_ARTIFACTS",
    "url_ttl_seconds": "KINEMA_URL_TTL_SECONDS",
    "list_models_timeout_seconds": "KINEMA_LIST_MODELS_TIMEOUT_SECONDS",
}


@dataclass(frozen=True)
class OrchestratorSettings:
    """Where the model services and the artifact store are, composed with the settings every service shares."""

    service: ServiceSettings
    text_encoder_url: str  # host:port of each model service
    denoiser_url: str
    autoencoder_url: str
    artifacts: str  # file:///path or s3://bucket?endpoint=host:port (kinema.storage.artifacts.store_from_uri)
    url_ttl_seconds: int = 3600  # lifetime of the presigned URLs in Generate results
    list_models_timeout_seconds: float = 5.0  # ListModels waits this long for each service
    s3_access_key: str = field(default="", repr=False)
    s3_secret_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        for name in ("text_encoder_url", "denoiser_url", "autoencoder_url", "artifacts"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{ENV_VARS[name]} must be set (a non-empty {'URI' if name == 'artifacts' else 'host:port'})"
                )
        ttl = self.url_ttl_seconds
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_EXPIRY.total_seconds():
            raise ValueError(
                f"{ENV_VARS['url_ttl_seconds']}={ttl!r}: must be an integer number of seconds in 1..604800"
            )
        timeout = self.list_models_timeout_seconds
        if not (isinstance(timeout, int | float) and 0 < timeout < float("inf")):
            raise ValueError(f"{ENV_VARS['list_models_timeout_seconds']}={timeout!r}: must be a finite number > 0")

    @property
    def addresses(self) -> dict[str, str]:
        """Capability -> host:port of the service serving it."""
        return {"text_encoder": self.text_encoder_url, "denoiser": self.denoiser_url,
                "autoencoder": self.autoencoder_url}  # fmt: skip

    @classmethod
    def from_env(
        cls, service: ServiceSettings | None = None, environ: Mapping[str, str] = os.environ
    ) -> OrchestratorSettings:
        """`service` (default: ServiceSettings.from_env) plus the orchestrator's `KINEMA_*` variables."""
        values: dict = {}
        for name, var in ENV_VARS.items():
            raw = (environ.get(var) or "").strip()
            if not raw:
                continue
            if name == "url_ttl_seconds":
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r}: must be an integer number of seconds in 1..604800") from None
            elif name == "list_models_timeout_seconds":
                try:
                    values[name] = float(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r}: must be a finite number > 0") from None
            else:
                values[name] = raw
        values.setdefault("text_encoder_url", "")
        values.setdefault("denoiser_url", "")
        values.setdefault("autoencoder_url", "")
        values.setdefault("artifacts", "")
        return cls(
            service=service if service is not None else ServiceSettings.from_env(environ),
            s3_access_key=environ.get(ENV_ACCESS_KEY, ""),
            s3_secret_key=environ.get(ENV_SECRET_KEY, ""),
            **values,
        )
