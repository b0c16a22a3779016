"""API keys per tenant. A key is shown once at creation; Redis keeps only its sha256.

Redis layout: hash `hotswap:apikeys` field sha256(key) -> JSON {"tenant", "created_at", "prefix"}.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis

from adapters.names import validate_tenant
from hotswap import keys

KEYS_HASH = keys.API_KEYS
KEY_PREFIX = "hs-"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(client: redis.Redis, tenant: str) -> str:
    """A new key for `tenant` (created on first key). Returned once; never stored in clear."""
    tenant = validate_tenant(tenant)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = {"tenant": tenant, "created_at": time.time(), "prefix": key[:8]}
    client.hset(KEYS_HASH, _digest(key), json.dumps(record))
    return key


def tenant_for_key(client: redis.Redis, key: str) -> str | None:
    raw = client.hget(KEYS_HASH, _digest(key))
    return json.loads(raw)["tenant"] if raw else None


def revoke_key(client: redis.Redis, key: str) -> bool:
    return bool(client.hdel(KEYS_HASH, _digest(key)))
