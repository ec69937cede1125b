"""API keys: who is calling, as a tenant, checked once per call by the server's interceptor.

A key is a random secret the operator hands to one tenant (`kinema keys new TENANT`). Servers never hold keys, only
their SHA-256, in a keys file (`KINEMA_API_KEYS_FILE`, e.g. a mounted Kubernetes Secret), one per line:

    # tenant   sha256 of the key (hex)
    acme       9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

A tenant may have several keys (rotation: add the new one, move clients, remove the old one). Clients send
`authorization: Bearer <key>` metadata. With a keys file the server answers UNAUTHENTICATED to a call without a key
or with one it does not know, and PERMISSION_DENIED to a key that asks (`kinema-tenant` metadata) to act for another
tenant; the caller's tenant is the key's. Health and reflection stay open (probes carry no keys). Without a keys
file calls are not authenticated and the tenant comes from `kinema-tenant` alone, as on a trusted network.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from kinema.errors import InvalidInput, PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    import grpc

AUTHORIZATION_KEY = "authorization"
TENANT_KEY = "kinema-tenant"
KEY_PREFIX = "kin_"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TENANT = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # as kinema.storage.artifacts.check_tenant

_TENANT_OF_CALL: contextvars.ContextVar[str | None] = contextvars.ContextVar("kinema_tenant", default=None)


def new_key() -> str:
    """A fresh API key: 'kin_' and 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    """The hex SHA-256 a keys file holds for `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


def authenticated_tenant() -> str | None:
    """The tenant whose key authenticated the current call, or None (no keys file, or outside a call)."""
    return _TENANT_OF_CALL.get()


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant: its API key's when the server checks keys, else the `kinema-tenant` metadata, else
    "default" (the orchestrator's and the distill service's jobs and artifacts belong to it)."""
    from kinema.storage.artifacts import DEFAULT_TENANT, check_tenant

    tenant = authenticated_tenant()
    if tenant is not None:
        return tenant
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_KEY:
            try:
                return check_tenant(value)
            except InvalidInput as e:
                raise InvalidInput(str(e), reason=e.reason, field=TENANT_KEY) from None
    return DEFAULT_TENANT


class ApiKeys:
    """The keys file: key hash -> tenant."""

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        self._tenants: dict[str, str] = {}
        for tenant, digest in entries:
            if self._tenants.setdefault(digest, tenant) != tenant:
                raise InvalidInput(f"one key hash is listed for two tenants ({self._tenants[digest]}, {tenant})")
        if not self._tenants:
            raise InvalidInput("the API keys file lists no keys; without keys no call could be made")

    @classmethod
    def parse(cls, text: str, source: str = "API keys") -> ApiKeys:
        """Lines of `tenant sha256hex` (or `tenant:sha256hex`); blank lines and `#` comments are skipped."""
        entries = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(":", " ").split()
            if len(parts) != 2 or not _TENANT.fullmatch(parts[0]) or not _SHA256.fullmatch(parts[1].lower()):
                raise InvalidInput(
                    f"{source} line {number}: expected 'TENANT SHA256' (a tenant name of a-z, 0-9, '.', '_', '-' "
                    "and the 64 hex digits `kinema keys new` prints), got something else"
                )  # the line itself may hold a key pasted by mistake: never echo it
            entries.append((parts[0], parts[1].lower()))
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path) -> ApiKeys:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise InvalidInput(f"cannot read the API keys file {path}: {e.strerror or e}") from None
        return cls.parse(text, str(path))

    def __len__(self) -> int:
        return len(self._tenants)

    def tenant_of(self, key: str) -> str | None:
        """The tenant `key` belongs to, or None. Compares digests in constant time."""
        digest = key_hash(key)
        found = None
        for known, tenant in self._tenants.items():
            if hmac.compare_digest(known, digest):
                found = tenant
        return found

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The caller's tenant from a call's metadata; Unauthenticated / PermissionDenied as the module says.

        Also records it for `authenticated_tenant()` in the current context (each gRPC call runs in its own).
        """
        key, asked = None, None
        for name, value in metadata or ():
            if name == AUTHORIZATION_KEY and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    key = token.strip()
            elif name == TENANT_KEY and isinstance(value, str):
                asked = value
        if key is None:
            raise Unauthenticated(
                "this server needs an API key: send the metadata 'authorization: Bearer <key>' "
                "(kinema --api-key, KINEMA_API_KEY)",
                reason="API_KEY_MISSING",
            )
        tenant = self.tenant_of(key)
        if tenant is None:
            raise Unauthenticated("the API key is not valid here (revoked, or for another server)",
                                  reason="API_KEY_INVALID")  # fmt: skip
        if asked is not None and asked != tenant:
            raise PermissionDenied(
                f"this API key acts for tenant {tenant!r}, not {asked!r}; drop the {TENANT_KEY} metadata or use "
                f"a key of {asked!r}",
                reason="TENANT_MISMATCH",
                field=TENANT_KEY,
            )
        _TENANT_OF_CALL.set(tenant)
        return tenant


__all__ = ["AUTHORIZATION_KEY", "KEY_PREFIX", "TENANT_KEY", "ApiKeys", "authenticated_tenant", "key_hash", "new_key"]
