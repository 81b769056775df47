"""Settings, shared resources and the authentication dependency of the API.

Everything a router needs arrives through FastAPI dependencies that read `app.state`, so `create_app` can be built
with explicit settings in tests and from the environment in production, with no module-level globals.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import AuthenticationError
from app.jobs import JobQueue
from workers.envconfig import env_values
from workers.store.redis_store import BlobStore

OPEN_TENANT = "default"
SECRET_FILENAME = "token_secret"


def parse_api_keys(spec: str) -> dict[str, str]:
    """`"key1:tenantA,key2:tenantB"` -> {key: tenant}; a key without a tenant is its own tenant."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, tenant = item.partition(":")
        keys[key.strip()] = tenant.strip() or key.strip()
    return keys


def load_secret(explicit: str | None, data_dir: Path) -> bytes:
    """The token-signing secret: KVC_SECRET if set, else a random one persisted under the data folder.

    Persisting it keeps issued tokens valid across restarts of a single-host deployment; a multi-host deployment
    must give every API process the same KVC_SECRET.
    """
    if explicit:
        return explicit.encode()
    path = data_dir / SECRET_FILENAME
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip().encode()


@dataclass(frozen=True)
class Settings:
    """API settings; `from_env` reads the KVC_* variables documented in the README."""

    redis_url: str | None = None
    data_dir: Path = Path("./data")
    model: str = "bundled"
    secret: str | None = None
    api_keys: dict[str, str] = field(default_factory=dict)
    max_input_bytes: int = 8 << 20
    max_input_tokens: int = 32768
    max_queue_depth: int = 64
    default_max_tokens: int = 256
    compact_wait_seconds: float = 600.0
    chat_wait_seconds: float = 300.0
    prefix: str = "kvc:"

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            redis_url=env.get("KVC_REDIS_URL") or None,
            data_dir=Path(env.get("KVC_DATA_DIR", "./data")),
            secret=env.get("KVC_SECRET") or None,
            api_keys=parse_api_keys(env.get("KVC_API_KEYS", "")),
            **env_values(cls, {
                "model": "KVC_MODEL", "max_input_bytes": "KVC_MAX_INPUT_BYTES",
                "max_input_tokens": "KVC_MAX_INPUT_TOKENS", "max_queue_depth": "KVC_MAX_QUEUE_DEPTH",
                "default_max_tokens": "KVC_DEFAULT_MAX_TOKENS", "compact_wait_seconds": "KVC_COMPACT_WAIT_SECONDS",
                "chat_wait_seconds": "KVC_CHAT_WAIT_SECONDS", "prefix": "KVC_REDIS_PREFIX",
            }),
        )


@dataclass
class Services:
    """Per-process resources built once by the app lifespan."""

    settings: Settings
    secret: bytes
    store: BlobStore
    jobs: JobQueue


def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_tenant(services: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The tenant of the caller's API key (`Authorization: Bearer <key>`); everyone is one tenant in open mode."""
    keys = services.settings.api_keys
    if not keys:
        return OPEN_TENANT
    scheme, _, given = (authorization or "").partition(" ")
    given_bytes = given.strip().encode()
    # Constant-time comparisons: response timing must not reveal how much of a key was right.
    tenant = next((tenant for key, tenant in keys.items()
                   if scheme.lower() == "bearer" and hmac.compare_digest(key.encode(), given_bytes)), None)
    if tenant is None:
        raise AuthenticationError("Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>'.")
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


def get_request_id(request: Request) -> str:
    """The request id set by the middleware in `app.main` (from `x-request-id` or generated)."""
    return request.state.request_id


RequestIdDep = Annotated[str, Depends(get_request_id)]
