"""The adapter registry: which LoRA adapters and full fine-tunes each tenant has, and where their files are.

Records live in Redis, files ("blobs") in object storage (`hotswap.storage`). A record is written only
after all of its blobs are uploaded, so a record never points at missing blobs; a failed upload
deletes what it uploaded and leaves no record. Versions are immutable once written: re-registering a
name creates the next version. Deleting only *marks* records deleted (new resolves fail, but requests
already queued with a resolved record can still fetch its blobs); `purge` removes blobs and record for
real, for a later garbage collector.

Storage layout (per tenant; names are validated by `adapters.names`, so every segment is safe)::

    tenants/{tenant}/models/{name}/v{version}/{filename}

Redis layout (`{tenant}` and `{name}` never contain ':', so keys cannot collide)::

    hotswap:reg:tenants                       SET     tenants that registered at least once
    hotswap:reg:{tenant}:names                SET     names of the tenant with at least one record
                                                      (deleted-but-not-purged ones included)
    hotswap:reg:{tenant}:model:{name}         HASH    version (decimal string) -> Record JSON
    hotswap:reg:{tenant}:model:{name}:next    STRING  INCR counter: the last version number handed out.
                                                      Never decremented or reset (not even by purge), so
                                                      a version number is never reused; a failed upload
                                                      burns its number.

Atomicity: version numbers come from INCR (two concurrent uploads of one name get different
versions); a record and its set memberships are written in one MULTI; delete and purge are WATCH/MULTI
transactions on the name's hash, so a delete racing a purge cannot resurrect a purged record.

Tenants never see each other's records: every key and storage prefix includes the tenant, and every
method takes the tenant explicitly.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from adapters.errors import MissingFileError
from adapters.format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MODEL_CONFIG,
    MODEL_INDEX,
    FullModelInfo,
    LoraAdapterInfo,
)
from adapters.names import format_ref, parse_ref, validate_name, validate_tenant
from hotswap import errors, keys

__all__ = [
    "Deleted",
    "FileRef",
    "NotFound",
    "Record",
    "Registry",
    "RegistryError",
    "blob_prefix",
    "content_digest",
]

log = logging.getLogger(__name__)

KEY_ROOT = keys.REGISTRY

# Files of a full fine-tune uploaded when present, besides config.json, the weights and the index.
FULL_OPTIONAL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# --------------------------------------------------------------------------------------------------
# Errors


class RegistryError(Exception):
    """A registry operation that cannot be done (other than a missing model)."""


class NotFound(errors.NotFound):
    """No such model (or version) for this tenant."""


class Deleted(NotFound):
    """The model (or that version of it) exists but was deleted."""


# --------------------------------------------------------------------------------------------------
# Records


class FileRef(BaseModel):
    """One stored file of a record."""

    model_config = ConfigDict(frozen=True)

    key: str  # storage key
    size: int
    sha256: str


def content_digest(files: Mapping[str, FileRef | Mapping[str, Any]]) -> str:
    """sha256 over the (filename, size, sha256) of every file: identifies a record's whole content.

    Two records share it only if they consist of byte-identical files under the same names (e.g. the
    same adapter registered twice), which is what the worker's disk cache keys entries by.
    """
    h = hashlib.sha256()
    for filename in sorted(files):
        f = files[filename]
        size, sha = (f.size, f.sha256) if isinstance(f, FileRef) else (f["size"], f["sha256"])
        h.update(f"{filename}\0{size}\0{sha}\n".encode())
    return h.hexdigest()


class Record(BaseModel):
    """One immutable version of a tenant's model. JSON: `record.model_dump_json()` / `Record.model_validate_json`."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    name: str
    version: int = Field(ge=1)
    kind: Literal["lora", "full"]
    base_model: str
    # LoRA only (None for full fine-tunes)
    rank: int | None = None
    target_modules: tuple[str, ...] | None = None
    alpha: float | None = None
    use_rslora: bool | None = None
    dtype: str | None = None  # of the weights, as adapters.format reports it
    size_bytes: int  # sum of all files
    sha256: str  # of the main weights file (see `weights_file`)
    weights_file: str  # adapter_model.safetensors | model.safetensors | model.safetensors.index.json | ...
    files: dict[str, FileRef]  # filename -> where it is stored
    owner: str  # the tenant that uploaded it (today always == tenant)
    created_at: float  # unix time
    deleted: bool = False
    deleted_at: float | None = None

    @property
    def ref(self) -> str:
        """`name@version`: the exact reference of this record."""
        return format_ref(self.name, self.version)

    @property
    def digest(self) -> str:
        """The content digest (see `content_digest`): the adapter disk cache's key."""
        return content_digest(self.files)

    @property
    def prefix(self) -> str:
        return blob_prefix(self.tenant, self.name, self.version)

    @property
    def scaling(self) -> float | None:
        """LoRA scaling (alpha / rank, or alpha / sqrt(rank) with rsLoRA); None for full fine-tunes."""
        if self.kind != "lora" or not self.rank or self.alpha is None:
            return None
        return self.alpha / (self.rank ** 0.5 if self.use_rslora else self.rank)


def blob_prefix(tenant: str, name: str, version: int) -> str:
    """Storage prefix of one version's files (ends with '/')."""
    return f"tenants/{tenant}/models/{name}/v{version}/"


# --------------------------------------------------------------------------------------------------
# Registry



class Registry:
    """Records in Redis (`redis_client`: a redis.Redis, either decode_responses setting), blobs in `store`."""

    def __init__(self, redis_client: Any, store: Any):
        self.redis = redis_client
        self.store = store

    @classmethod
    def from_settings(cls, settings: Any = None) -> "Registry":
        import redis

        from hotswap.settings import get_settings
        from hotswap.storage import open_store

        settings = settings or get_settings()
        return cls(redis.Redis.from_url(settings.redis_url), open_store(settings))

    # ---- keys

    @staticmethod
    def _names_key(tenant: str) -> str:
        return f"{KEY_ROOT}:{tenant}:names"

    @staticmethod
    def _model_key(tenant: str, name: str) -> str:
        return f"{KEY_ROOT}:{tenant}:model:{name}"

    @staticmethod
    def _counter_key(tenant: str, name: str) -> str:
        return f"{KEY_ROOT}:{tenant}:model:{name}:next"

    # ---- register

    @staticmethod
    def _files_to_upload(kind: str, source: Path, info: Any) -> tuple[list[str], str]:
        """(filenames to upload, the main weights filename), checking they exist."""
        if kind == "lora":
            if not isinstance(info, LoraAdapterInfo):
                raise TypeError(f"kind 'lora' needs the LoraAdapterInfo of the adapter, got {type(info).__name__}")
            files, main = [ADAPTER_CONFIG, ADAPTER_WEIGHTS], ADAPTER_WEIGHTS
        elif kind == "full":
            if not isinstance(info, FullModelInfo):
                raise TypeError(f"kind 'full' needs the FullModelInfo of the checkpoint, got {type(info).__name__}")
            weights = sorted(info.files)
            files = [MODEL_CONFIG] + [f for f in FULL_OPTIONAL_FILES if (source / f).is_file()] + weights
            if (source / MODEL_INDEX).is_file():
                files.append(MODEL_INDEX)
                main = MODEL_INDEX
            else:
                main = "model.safetensors" if "model.safetensors" in weights else weights[0]
        else:
            raise ValueError(f"kind must be 'lora' or 'full', got {kind!r}")
        for filename in files:
            if Path(filename).name != filename or filename in ("", ".", ".."):
                raise ValueError(f"refusing to upload {filename!r}: not a plain file name")
            if not (source / filename).is_file():
                raise MissingFileError(f"{source} has no {filename}: nothing was uploaded")
        return files, main

    def _allocate_version(self, tenant: str, name: str) -> int:
        model_key, counter = self._model_key(tenant, name), self._counter_key(tenant, name)
        while True:
            version = int(self.redis.incr(counter))
            # Guard against a counter lost or reset behind the records' back: never reuse a version.
            if not self.redis.hexists(model_key, str(version)):
                return version
            log.warning("registry counter %s handed out existing version %d; skipping it", counter, version)

    def _discard_blobs(self, prefix: str, keys: Iterable[str]) -> None:
        try:
            self.store.delete_prefix(prefix)
            return
        except Exception:  # noqa: BLE001 - best effort; fall back to the keys we know
            log.exception("could not delete %s after a failed upload; deleting file by file", prefix)
        for key in keys:
            try:
                self.store.delete(key)
            except Exception:  # noqa: BLE001
                log.exception("could not delete %s after a failed upload", key)

    def register(
        self,
        tenant: str,
        name: str,
        kind: Literal["lora", "full"],
        base_model: str,
        source_dir: str | Path,
        info: LoraAdapterInfo | FullModelInfo,
    ) -> Record:
        """Upload a validated adapter / fine-tune dir as the next version of `name`; return its record.

        `info` is what `inspect_lora_adapter` / `inspect_full_checkpoint` returned for `source_dir`.
        Uploaded: LoRA: adapter_config.json + adapter_model.safetensors; full: config.json, the
        optional generation/tokenizer files present, the safetensors weights (`info.files`) and the
        shard index if any. If anything fails, the blobs uploaded so far are deleted, no record is
        written and the error is re-raised.
        """
        validate_tenant(tenant)
        validate_name(name)
        if not isinstance(base_model, str) or not base_model:
            raise ValueError("base_model must be a non-empty string")
        source = Path(source_dir)
        filenames, main = self._files_to_upload(kind, source, info)

        version = self._allocate_version(tenant, name)
        prefix = blob_prefix(tenant, name, version)
        uploaded: dict[str, FileRef] = {}
        try:
            for filename in filenames:
                key = prefix + filename
                obj = self.store.put_file(key, source / filename)
                uploaded[filename] = FileRef(key=key, size=int(obj.size), sha256=obj.sha256)
            lora = isinstance(info, LoraAdapterInfo)
            record = Record(
                tenant=tenant,
                name=name,
                version=version,
                kind=kind,
                base_model=base_model,
                rank=info.rank if lora else None,
                target_modules=tuple(info.target_modules) if lora else None,
                alpha=float(info.alpha) if lora else None,
                use_rslora=bool(info.use_rslora) if lora else None,
                dtype=info.dtype,
                size_bytes=sum(f.size for f in uploaded.values()),
                sha256=uploaded[main].sha256,
                weights_file=main,
                files=uploaded,
                owner=tenant,
                created_at=time.time(),
            )
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self._model_key(tenant, name), str(version), record.model_dump_json())
                pipe.sadd(self._names_key(tenant), name)
                pipe.sadd(f"{KEY_ROOT}:tenants", tenant)
                pipe.execute()
        except BaseException:
            self._discard_blobs(prefix, [f.key for f in uploaded.values()])
            raise
        log.info("registered %s/%s (%s, %d bytes)", tenant, record.ref, kind, record.size_bytes)
        return record

    # ---- read

    @staticmethod
    def _parse_all(raw: Mapping[Any, Any]) -> list[Record]:
        records = [Record.model_validate_json(value) for value in raw.values()]
        return sorted(records, key=lambda r: r.version)

    def _all(self, tenant: str, name: str) -> list[Record]:
        return self._parse_all(self.redis.hgetall(self._model_key(tenant, name)))

    def get(self, tenant: str, name: str, version: int) -> Record:
        """That exact version, deleted or not (workers finishing queued requests use this). NotFound if absent."""
        validate_tenant(tenant)
        validate_name(name)
        raw = self.redis.hget(self._model_key(tenant, name), str(int(version)))
        if raw is None:
            raise NotFound(f"model {format_ref(name, version)!r} not found for tenant {tenant!r}")
        return Record.model_validate_json(raw)

    def resolve(self, tenant: str, ref: str) -> Record:
        """`name` / `name@latest` -> the latest non-deleted version; `name@3` -> version 3.

        Raises `NotFound` for an unknown name or version, `Deleted` (a NotFound) when it was deleted,
        ValueError for a malformed reference.
        """
        validate_tenant(tenant)
        name, version = parse_ref(ref)
        if version is not None:
            record = self.get(tenant, name, version)
            if record.deleted:
                raise Deleted(f"model {record.ref!r} was deleted; use '{name}' for its latest version")
            return record
        records = self._all(tenant, name)
        if not records:
            raise NotFound(f"no model named {name!r} for tenant {tenant!r}")
        live = [r for r in records if not r.deleted]
        if not live:
            raise Deleted(f"model {name!r} was deleted (all {len(records)} version(s))")
        return live[-1]

    def versions(self, tenant: str, name: str, include_deleted: bool = False) -> list[Record]:
        """Every version of `name`, oldest first ([] for an unknown name)."""
        validate_tenant(tenant)
        validate_name(name)
        records = self._all(tenant, name)
        return records if include_deleted else [r for r in records if not r.deleted]

    def list(self, tenant: str) -> list[Record]:
        """The latest non-deleted version of each of the tenant's models, sorted by name."""
        validate_tenant(tenant)
        names = sorted(keys.text(n) for n in self.redis.smembers(self._names_key(tenant)))
        if not names:
            return []
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._model_key(tenant, name))
            results = pipe.execute()
        out = []
        for raw in results:
            live = [r for r in self._parse_all(raw) if not r.deleted]
            if live:
                out.append(live[-1])
        return out

    # ---- delete / purge

    def delete(self, tenant: str, ref: str) -> list[Record]:
        """Mark `name` (every version) or `name@3` (one version) deleted; return the records newly marked.

        Records and blobs stay (queued requests can finish); new resolves fail. NotFound if there is no
        such model/version, Deleted if it was already deleted.
        """
        validate_tenant(tenant)
        name, version = parse_ref(ref)
        key = self._model_key(tenant, name)
        what = format_ref(name, version)

        def txn(pipe: Any) -> list[Record]:
            if version is None:
                records = self._parse_all(pipe.hgetall(key))
            else:
                raw = pipe.hget(key, str(version))
                records = [] if raw is None else [Record.model_validate_json(raw)]
            if not records:
                raise NotFound(f"model {what!r} not found for tenant {tenant!r}")
            live = [r for r in records if not r.deleted]
            if not live:
                raise Deleted(f"model {what!r} is already deleted")
            now = time.time()
            marked = [r.model_copy(update={"deleted": True, "deleted_at": now}) for r in live]
            pipe.multi()
            pipe.hset(key, mapping={str(r.version): r.model_dump_json() for r in marked})
            return marked

        marked = self.redis.transaction(txn, key, value_from_callable=True)
        log.info("deleted %s/%s (%d version(s))", tenant, what, len(marked))
        return marked

    def purge(self, tenant: str, name: str, version: int, *, force: bool = False) -> None:
        """Remove one version's blobs and record for real (garbage collection; not exposed to users).

        Refuses a version not marked deleted unless `force`. Blobs go first, then the record, so a purge
        interrupted halfway can simply be retried (the record is the to-do list). The version counter is
        kept: the number is never reused.
        """
        record = self.get(tenant, name, version)
        if not record.deleted and not force:
            raise RegistryError(f"model {record.ref!r} is not deleted; delete it first (or purge with force=True)")
        self.store.delete_prefix(record.prefix)
        for f in record.files.values():  # any file stored outside the prefix (none today)
            if not f.key.startswith(record.prefix):
                self.store.delete(f.key)
        key, names_key, field = self._model_key(tenant, name), self._names_key(tenant), str(record.version)

        def txn(pipe: Any) -> None:
            remaining = pipe.hlen(key) - (1 if pipe.hexists(key, field) else 0)
            pipe.multi()
            pipe.hdel(key, field)
            if remaining == 0:
                pipe.srem(names_key, name)

        self.redis.transaction(txn, key)
        log.info("purged %s/%s", tenant, record.ref)
