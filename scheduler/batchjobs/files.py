"""Files of the OpenAI Files API: batch inputs users upload, and the batch results we write.

Blobs live in object storage, records in Redis; both are per tenant, and every method takes the
tenant explicitly, so a tenant can never reach another's file: an id of another tenant is simply
not in its hash (FileNotFound, the same as an id that never existed).

    tenants/{tenant}/files/{file_id}/{safe filename}      the bytes (hotswap.storage, sha256-checked)
    hotswap:files:{tenant}                                HASH  file_id -> FileRecord JSON

Ordering keeps a record from ever pointing at a missing blob: create writes the blob, then the
record (and deletes the blob if the record fails); delete removes the record, then the blob.

Ids are "file-" + 24 hex digits: 13 of microseconds since the epoch, then 11 random ones, so they
sort by creation time. That makes "newest first" exact and `after` a plain comparison that still
works when the cursor's file has been deleted meanwhile.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from pydantic import BaseModel

from hotswap import keys
from hotswap.errors import NotFound
from hotswap.storage import ObjectNotFound, ObjectStore

__all__ = ["FILE_ID", "FileCatalog", "FileNotFound", "FileRecord", "Purpose", "PURPOSES", "file_key", "new_file_id"]

log = logging.getLogger(__name__)

Purpose = Literal["batch", "batch_output"]
PURPOSES: tuple[str, ...] = ("batch", "batch_output")
FILE_ID = re.compile(r"file-[0-9a-f]{24}")
MAX_FILENAME = 255


class FileNotFound(NotFound):
    """No such file for this tenant (whether it never existed, was deleted, or is another's)."""


class FileRecord(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Purpose
    status: Literal["processed"] = "processed"
    tenant: str
    storage_key: str
    sha256: str

    def to_openai(self) -> dict:
        """The public JSON (OpenAI's FileObject): no tenant, no storage key."""
        return self.model_dump(include={"id", "object", "bytes", "created_at", "filename", "purpose", "status"}) \
            | {"expires_at": None, "status_details": None}


def new_file_id(now_us: int | None = None) -> str:
    now_us = time.time_ns() // 1000 if now_us is None else now_us
    return f"file-{now_us:013x}{secrets.token_hex(6)[:11]}"


def _safe_filename(filename: str) -> str:
    """One storage-key segment derived from a user's file name (kept as given in the record)."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()  # é -> e
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".")[:128] or "file"


def _clean_filename(filename: str) -> str:
    # No control characters, and no lone surrogates (they cannot be stored as UTF-8).
    name = "".join(c for c in filename if unicodedata.category(c) not in ("Cc", "Cs")).strip()[:MAX_FILENAME]
    return name or "file"


def file_key(tenant: str, file_id: str, filename: str) -> str:
    return f"tenants/{tenant}/files/{file_id}/{_safe_filename(filename)}"


def _check_tenant(tenant: str) -> str:
    # Tenants are validated where they are created (api keys); this only guards the key layout.
    if not isinstance(tenant, str) or not tenant or re.search(r"[:/\s]", tenant):
        raise ValueError(f"invalid tenant {tenant!r}")
    return tenant


class FileCatalog:
    def __init__(self, redis_client, store: ObjectStore):
        self.redis = redis_client
        self.store = store

    def _hash(self, tenant: str) -> str:
        return keys.files(_check_tenant(tenant))

    def create(self, tenant: str, purpose: str, filename: str, source: Path | bytes | BinaryIO) -> FileRecord:
        """Store `source` (a path, bytes or a binary stream, read once) and record it."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
        hash_key, now_us = self._hash(tenant), time.time_ns() // 1000
        file_id, filename = new_file_id(now_us), _clean_filename(filename)
        key = file_key(tenant, file_id, filename)
        try:
            if isinstance(source, (bytes, bytearray, memoryview)):
                info = self.store.put_bytes(key, bytes(source))
            elif isinstance(source, (str, Path)):
                info = self.store.put_file(key, source)
            else:
                info = self.store.put_stream(key, source)
            record = FileRecord(id=file_id, bytes=info.size, created_at=now_us // 1_000_000, filename=filename,
                                purpose=purpose, tenant=tenant, storage_key=key, sha256=info.sha256)
            self.redis.hset(hash_key, file_id, record.model_dump_json())
        except BaseException:
            self._delete_blob(key)  # whatever part of the blob got written: nothing is left behind
            raise
        return record

    def get(self, tenant: str, file_id: str) -> FileRecord:
        raw = self.redis.hget(self._hash(tenant), file_id) if FILE_ID.fullmatch(file_id or "") else None
        if raw is None:
            raise FileNotFound(f"no file {file_id!r}")
        return FileRecord.model_validate_json(raw)

    def list(self, tenant: str, purpose: str | None = None, limit: int = 10000,
             after: str | None = None) -> list[FileRecord]:
        """Newest first; `after` (an id) starts just past that file, as OpenAI's cursor does."""
        rows = self.redis.hgetall(self._hash(tenant))
        records = sorted((FileRecord.model_validate_json(v) for v in rows.values()),
                         key=lambda r: r.id, reverse=True)
        return [r for r in records if (purpose is None or r.purpose == purpose)
                and (after is None or r.id < after)][:max(limit, 0)]

    def delete(self, tenant: str, file_id: str) -> FileRecord:
        record = self.get(tenant, file_id)
        if not self.redis.hdel(self._hash(tenant), file_id):
            raise FileNotFound(f"no file {file_id!r}")  # deleted concurrently
        self._delete_blob(record.storage_key)
        return record

    def _delete_blob(self, storage_key: str) -> None:
        try:
            self.store.delete_prefix(storage_key.rsplit("/", 1)[0] + "/")
        except Exception:  # no record points at it any more; an orphan blob is only wasted space
            log.warning("could not delete the blob %s", storage_key, exc_info=True)

    def open(self, tenant: str, file_id: str) -> Iterator[bytes]:
        """The file's bytes in chunks, sha256-verified when the stream ends (IntegrityError then if
        they differ). The lookup happens now, so FileNotFound comes before any byte."""
        record = self.get(tenant, file_id)
        try:
            return self.store.iter_chunks(record.storage_key)
        except ObjectNotFound:
            raise FileNotFound(f"the content of file {file_id!r} is missing") from None

    def read_bytes(self, tenant: str, file_id: str) -> bytes:
        return b"".join(self.open(tenant, file_id))

    def iter_lines(self, tenant: str, file_id: str) -> Iterator[bytes]:
        """The file's lines (with their b"\\n"), streamed; for reading batch inputs and results.
        A checksum mismatch raises at the end, after the lines: treat that as the whole file failing."""
        buf, scanned = bytearray(), 0
        for chunk in self.open(tenant, file_id):
            buf += chunk
            start = 0
            while (end := buf.find(b"\n", scanned)) >= 0:
                yield bytes(buf[start:end + 1])
                start = scanned = end + 1
            del buf[:start]
            scanned = len(buf)  # never rescan a long line's head
        if buf:
            yield bytes(buf)

    def presigned_url(self, tenant: str, file_id: str, expires_s: int | None = None) -> str | None:
        """A direct download URL (S3 only; None for file:// storage)."""
        return self.store.presigned_url(self.get(tenant, file_id).storage_key, expires_s)
