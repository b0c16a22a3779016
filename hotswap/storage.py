"""Object storage for adapters and checkpoints: one interface, two backends.

    store = open_store(settings)            # s3://bucket/prefix (boto3) or file:///dir
    info = store.put_file("adapters/abc/adapter.safetensors", path)
    store.download(info.key, dest)          # streamed, verified, atomic

Every object written gets a sha256, computed while the bytes stream through (the source is read
once), and every read verifies it: a mismatch raises IntegrityError, never silently returns data.

Layout, the same in both backends, relative to the store root (the S3 prefix or the directory):

    <key>                   the object's bytes
    .meta/<key>.json        its hash record: {"sha256": "<hex>", "size": <bytes>}

`.meta/` is reserved (keys may not start with it) and hidden from list(). The record is a separate
object because S3 metadata can only be set when an object is created, while a streamed multipart
upload only knows its hash at the end (and copy_object to add metadata afterwards stops at 5 GB).

Ordering makes a crash safe: a write deletes the old record, writes the data, then writes the new
record; a delete removes the record, then the data. An object exists only when both its data and its
record do, so data left without a record (a crash between the two writes) reads as absent
(ObjectNotFound) and is never served unverified; put() the key again, or delete_prefix(), to clean
it up. Concurrent writers of the same key are not coordinated: keep keys write-once (content- or
version-addressed), or give each key a single writer.

Nothing here does I/O at import time, and boto3 is imported only when an S3Store is built.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from hotswap.errors import NotFound

if TYPE_CHECKING:
    from hotswap.settings import Settings

__all__ = [
    "ObjectInfo", "StorageError", "ObjectNotFound", "IntegrityError", "ObjectStore",
    "S3Store", "FileStore", "open_store", "validate_key",
]

META_DIR = ".meta"
META_PREFIX = META_DIR + "/"
RECORD_SUFFIX = ".json"
TMP_PREFIX = ".hotswap-tmp-"
CHUNK = 1 << 20
MAX_KEY_BYTES = 1024  # S3's limit on a whole key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str  # hex


class StorageError(Exception):
    """Storage failed: bucket missing, access denied, endpoint unreachable, disk error, ..."""


class ObjectNotFound(StorageError, NotFound):
    """No such object (or its hash record is missing, so it cannot be served verified)."""


class IntegrityError(StorageError):
    """The bytes read do not match the sha256/size recorded when the object was written."""


@runtime_checkable
class ObjectStore(Protocol):
    url: str

    def put_file(self, key: str, path: str | Path) -> ObjectInfo: ...
    def put_stream(self, key: str, stream: BinaryIO) -> ObjectInfo: ...
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download(self, key: str, dest: str | Path) -> ObjectInfo: ...
    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]: ...
    def info(self, key: str) -> ObjectInfo: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def presigned_url(self, key: str, expires_s: int | None = None) -> str | None: ...


# ---------------------------------------------------------------------------------------------
# Keys


def validate_key(key: str) -> str:
    """Return `key` if it is a safe '/'-separated object key, else raise ValueError."""
    if not isinstance(key, str):
        raise TypeError(f"object key must be a str, not {type(key).__name__}")
    if not key:
        raise ValueError("object key is empty")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} must not start with '/'")
    if "\\" in key:
        raise ValueError(f"object key {key!r} must not contain backslashes (keys are '/'-separated)")
    if any(unicodedata.category(c) == "Cc" for c in key):
        raise ValueError(f"object key {key!r} must not contain control characters")
    if "//" in key:
        raise ValueError(f"object key {key!r} must not contain '//'")
    if key.endswith("/"):
        raise ValueError(f"object key {key!r} must not end with '/'")
    if any(seg in (".", "..") for seg in key.split("/")):
        raise ValueError(f"object key {key!r} must not contain '.' or '..' segments")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"object key is longer than {MAX_KEY_BYTES} bytes")
    return key


def _check_key(key: str) -> str:
    """validate_key plus the names this module reserves for itself."""
    validate_key(key)
    segments = key.split("/")
    if segments[0] == META_DIR:
        raise ValueError(f"object key {key!r}: the '{META_PREFIX}' prefix is reserved for hash records")
    if any(seg.startswith(TMP_PREFIX) for seg in segments):
        raise ValueError(f"object key {key!r}: names starting {TMP_PREFIX!r} are reserved for temp files")
    return key


def _is_valid_key(key: str) -> bool:
    try:
        _check_key(key)
    except ValueError:
        return False
    return True


def _check_prefix(prefix: str) -> str:
    """A list/delete prefix: '' (everything) or a valid key, optionally ending in '/'.
    Prefixes match as plain strings (as in S3): 'a/b' also matches 'a/bc'; use 'a/b/' for a folder."""
    if prefix:
        _check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _record_key(key: str) -> str:
    return META_PREFIX + key + RECORD_SUFFIX


def _encode_record(info: ObjectInfo) -> bytes:
    return json.dumps({"sha256": info.sha256, "size": info.size}).encode()


def _decode_record(key: str, raw: bytes, where: str) -> ObjectInfo:
    try:
        rec = json.loads(raw)
        sha, size = rec["sha256"], rec["size"]
        if not (isinstance(sha, str) and len(sha) == 64 and isinstance(size, int) and size >= 0):
            raise ValueError
        int(sha, 16)
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"hash record of {where} is malformed") from None
    return ObjectInfo(key=key, size=size, sha256=sha.lower())


# ---------------------------------------------------------------------------------------------
# Streaming helpers


class _HashingReader:
    """A read-only, non-seekable view of a stream that hashes and counts what passes through.

    Non-seekable on purpose: boto3's transfer manager then reads it strictly in order, one part at
    a time, so the hash is of the bytes in upload order and only a few parts are ever in memory.
    read(n) returns exactly n bytes unless the stream ends (boto3 would otherwise upload short
    reads as undersized parts)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while chunk := self._raw.read(CHUNK):
                parts.append(chunk)
            data = b"".join(parts)
        else:
            data = self._raw.read(n) if n else b""
            if data and len(data) < n:
                parts = [data]
                got = len(data)
                while got < n and (chunk := self._raw.read(n - got)):
                    parts.append(chunk)
                    got += len(chunk)
                data = b"".join(parts)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"put_stream needs a binary stream, got {type(data).__name__} from read()")
        self._hash.update(data)
        self.size += len(data)
        return bytes(data)

    def info(self, key: str) -> ObjectInfo:
        return ObjectInfo(key=key, size=self.size, sha256=self._hash.hexdigest())


class _VerifiedChunks(Iterator[bytes]):
    """Yields an object's chunks, hashing them; raises IntegrityError when the stream ends (or
    overruns the recorded size) if the bytes differ from the record. Closes the source when done;
    use `with` (or close()) when abandoning it early."""

    def __init__(self, info: ObjectInfo, chunks: Iterator[bytes], close: Callable[[], None], where: str):
        self.info = info
        self._chunks = chunks
        self._close = close
        self._where = where
        self._hash = hashlib.sha256()
        self._size = 0
        self._finished = False

    def __iter__(self) -> _VerifiedChunks:
        return self

    def __next__(self) -> bytes:
        if self._finished:
            raise StopIteration
        try:
            chunk = next(self._chunks)
        except StopIteration:
            self.close()
            self._verify()
            raise
        except BaseException:
            self.close()
            raise
        self._hash.update(chunk)
        self._size += len(chunk)
        if self._size > self.info.size:
            self.close()
            raise IntegrityError(f"{self._where} is longer than the {self.info.size} bytes recorded")
        return chunk

    def _verify(self) -> None:
        if self._size != self.info.size:
            raise IntegrityError(f"{self._where} has {self._size} bytes, {self.info.size} recorded")
        actual = self._hash.hexdigest()
        if actual != self.info.sha256:
            raise IntegrityError(f"{self._where} is corrupt: sha256 {actual}, {self.info.sha256} recorded")

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._close()

    def __enter__(self) -> _VerifiedChunks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _StoreBase:
    """What both backends share; each supplies _read_record, _open_data, put_stream, ..."""

    url: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _where(self, key: str) -> str:
        raise NotImplementedError

    def _read_record(self, key: str) -> ObjectInfo:
        raise NotImplementedError

    def _open_data(self, key: str, chunk_size: int) -> tuple[int, Iterator[bytes], Callable[[], None]]:
        """(size, chunks, close) of the data object; ObjectNotFound if absent."""
        raise NotImplementedError

    def put_stream(self, key: str, stream: BinaryIO) -> ObjectInfo:
        raise NotImplementedError

    def put_file(self, key: str, path: str | Path) -> ObjectInfo:
        _check_key(key)
        with open(path, "rb") as f:
            return self.put_stream(key, f)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self.put_stream(key, io.BytesIO(data))

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """Streams the object. The lookup happens now (ObjectNotFound is raised by this call, not by
        the first next()), so a caller can still pick a status code before it starts streaming."""
        _check_key(key)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        record = self._read_record(key)
        size, chunks, close = self._open_data(key, chunk_size)
        where = self._where(key)
        if size != record.size:
            close()
            raise IntegrityError(f"{where} has {size} bytes, {record.size} recorded")
        return _VerifiedChunks(record, chunks, close, where)

    def get_bytes(self, key: str) -> bytes:
        with self.iter_chunks(key, 8 * CHUNK) as chunks:  # type: ignore[attr-defined]
            return b"".join(chunks)

    def download(self, key: str, dest: str | Path) -> ObjectInfo:
        """Streams the object into `dest` through a temp file beside it, renamed into place only
        once verified: `dest` is either the whole verified object or left as it was."""
        chunks = self.iter_chunks(key)
        dest = Path(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        except BaseException:
            chunks.close()  # type: ignore[attr-defined]
            raise
        try:
            with os.fdopen(fd, "wb") as f, chunks:  # type: ignore[attr-defined]
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return chunks.info  # type: ignore[attr-defined]

    def exists(self, key: str) -> bool:
        try:
            self.info(key)
        except ObjectNotFound:
            return False
        return True

    def info(self, key: str) -> ObjectInfo:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# file:///dir


class FileStore(_StoreBase):
    """Objects as files under a root directory (created if missing). Writes go to a temp file in
    the target's directory, fsync'd, then os.replace'd: readers see the old file or the new one.
    Note that unlike S3 a key cannot be both an object and a 'folder' ('a' and 'a/b')."""

    def __init__(self, url: str | Path):
        text = str(url)
        if text.startswith("file://"):
            text = text[len("file://"):]
            if text.startswith("localhost/"):
                text = text[len("localhost"):]
        elif "://" in text:
            raise ValueError(f"not a file:// URL: {url!r}")
        if not text:
            raise ValueError(f"file:// URL without a directory: {url!r}")
        root = Path(text).expanduser()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create storage directory {root}: {e}") from e
        self.root = Path(os.path.realpath(root))
        self.url = f"file://{self.root}"

    # -- paths

    def _where(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _inside(self, path: Path) -> Path:
        real = os.path.realpath(path)
        if os.path.commonpath([real, str(self.root)]) != str(self.root):
            raise ValueError(f"{path} resolves outside the store root {self.root}")
        return path

    def _data_path(self, key: str) -> Path:
        return self._inside(self.root.joinpath(*_check_key(key).split("/")))

    def _record_path(self, key: str) -> Path:
        return self._inside(self.root.joinpath(*_record_key(_check_key(key)).split("/")))

    @contextmanager
    def _fs_errors(self, what: str):
        try:
            yield
        except OSError as e:
            raise StorageError(f"{what} failed: {e}") from e

    def _mkstemp(self, parent: Path) -> tuple[int, str]:
        for attempt in range(3):  # a concurrent delete may prune the directory we just made
            parent.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(prefix=TMP_PREFIX, dir=parent)
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _prune(self, path: Path, stop: Path) -> None:
        """Remove now-empty directories from path's parent up to (not including) stop."""
        d = path.parent
        while d != stop and stop in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent

    # -- records

    def _read_record(self, key: str) -> ObjectInfo:
        try:
            raw = self._record_path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"no object {self._where(key)}") from None
        except OSError as e:
            raise StorageError(f"reading the hash record of {self._where(key)} failed: {e}") from e
        return _decode_record(key, raw, self._where(key))

    def _write_record(self, info: ObjectInfo) -> None:
        path = self._record_path(info.key)
        with self._fs_errors(f"writing the hash record of {self._where(info.key)}"):
            fd, tmp = self._mkstemp(path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_encode_record(info))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                _unlink_quietly(tmp)
                raise

    def _delete_record(self, key: str) -> None:
        path = self._record_path(key)
        with self._fs_errors(f"deleting the hash record of {self._where(key)}"):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return
        self._prune(path, self.root / META_DIR)

    # -- data

    def _open_data(self, key: str, chunk_size: int) -> tuple[int, Iterator[bytes], Callable[[], None]]:
        path = self._data_path(key)
        try:
            f = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise ObjectNotFound(f"no object {self._where(key)}") from None
        except OSError as e:
            raise StorageError(f"opening {self._where(key)} failed: {e}") from e
        size = os.fstat(f.fileno()).st_size
        return size, iter(lambda: f.read(chunk_size), b""), f.close

    def put_stream(self, key: str, stream: BinaryIO) -> ObjectInfo:
        path = self._data_path(key)
        self._delete_record(key)
        reader = _HashingReader(stream)
        with self._fs_errors(f"writing {self._where(key)}"):
            fd, tmp = self._mkstemp(path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                while chunk := reader.read(CHUNK):  # errors from the source propagate as they are
                    with self._fs_errors(f"writing {self._where(key)}"):
                        f.write(chunk)
                with self._fs_errors(f"writing {self._where(key)}"):
                    f.flush()
                    os.fsync(f.fileno())
            with self._fs_errors(f"writing {self._where(key)}"):
                os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        info = reader.info(key)
        self._write_record(info)
        return info

    def info(self, key: str) -> ObjectInfo:
        record = self._read_record(key)
        try:
            st = self._data_path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"no object {self._where(key)}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"no object {self._where(key)}")
        if st.st_size != record.size:
            raise IntegrityError(f"{self._where(key)} has {st.st_size} bytes, {record.size} recorded")
        return record

    def delete(self, key: str) -> None:
        path = self._data_path(key)
        self._delete_record(key)
        with self._fs_errors(f"deleting {self._where(key)}"):
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return
        self._prune(path, self.root)

    def _walk(self, top: Path, prefix: str, suffix: str = "") -> Iterable[str]:
        """Keys (relative to top, suffix stripped) of the files under top starting with prefix."""
        start = top.joinpath(*prefix.split("/")[:-1]) if "/" in prefix else top
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            rel = os.path.relpath(dirpath, top)
            base = "" if rel == "." else Path(rel).as_posix() + "/"
            if top == self.root and base == "":
                dirnames[:] = [d for d in dirnames if d != META_DIR]
            dirnames[:] = [d for d in dirnames if (base + d + "/").startswith(prefix) or prefix.startswith(base + d + "/")]
            for name in filenames:
                if name.startswith(TMP_PREFIX) or not name.endswith(suffix):
                    continue
                key = base + (name[: len(name) - len(suffix)] if suffix else name)
                if key.startswith(prefix) and _is_valid_key(key):
                    yield key

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        _check_prefix(prefix)
        out = []
        for key in sorted(self._walk(self.root, prefix)):
            try:
                out.append(self._read_record(key))
            except (ObjectNotFound, ValueError):
                continue
        return out

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to empty the whole store)")
        _check_prefix(prefix)
        data = set(self._walk(self.root, prefix))
        records = set(self._walk(self.root / META_DIR, prefix, RECORD_SUFFIX))
        for key in records:
            self._delete_record(key)
        for key in data:
            path = self._data_path(key)
            with self._fs_errors(f"deleting {self._where(key)}"):
                _unlink_quietly(path)
            self._prune(path, self.root)
        return len(data & records)

    def presigned_url(self, key: str, expires_s: int | None = None) -> str | None:
        _check_key(key)
        return None


# ---------------------------------------------------------------------------------------------
# s3://bucket/prefix


def _parse_s3_url(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise ValueError(f"s3:// URL without a bucket: {url!r}")
    if prefix:
        validate_key(prefix)
    return bucket, prefix


class S3Store(_StoreBase):
    """Objects in an S3 (or MinIO, or any S3-compatible) bucket under an optional prefix.
    Uploads stream through boto3's transfer manager: multipart above s3_multipart_threshold_mb,
    parts of that size, a few parts in memory at most."""

    MAX_IN_MEMORY_PARTS = 4

    def __init__(self, url: str, settings: Settings | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if settings is None:
            from hotswap.settings import get_settings

            settings = get_settings()
        self.bucket, self.prefix = _parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.endpoint_url = settings.s3_endpoint_url
        config = Config(
            signature_version="s3v4",
            region_name=settings.s3_region,
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        creds = {}
        if settings.s3_access_key_id:
            creds["aws_access_key_id"] = settings.s3_access_key_id
        if settings.s3_secret_access_key is not None:
            creds["aws_secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
        # A session of our own: boto3's default session is not safe to share across threads.
        session = boto3.session.Session()
        self._client = session.client("s3", endpoint_url=settings.s3_endpoint_url,
                                      region_name=settings.s3_region, config=config, **creds)
        part = settings.s3_multipart_threshold_mb * (1 << 20)
        self._transfer = TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                                        max_concurrency=self.MAX_IN_MEMORY_PARTS,
                                        preferred_transfer_client="classic")
        # Bounds memory for a non-seekable source: at most this many parts are buffered at once.
        self._transfer.max_in_memory_upload_chunks = self.MAX_IN_MEMORY_PARTS
        self._threshold = part
        self._presign_expiry_s = settings.presign_expiry_s

    # -- keys and errors

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    @contextmanager
    def _errors(self, what: str, key: str | None = None):
        """Maps botocore's exceptions: 404s to ObjectNotFound, the rest to a readable StorageError."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError,
                                         NoCredentialsError)

        where = self._where(key) if key is not None else self.url
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = err.get("Message") or code or str(e)
            if code == "NoSuchBucket":
                raise StorageError(f"{what} {where}: bucket {self.bucket!r} does not exist"
                                   f"{' at ' + self.endpoint_url if self.endpoint_url else ''}") from e
            if code in ("NoSuchKey", "NotFound", "404") or (status == 404 and key is not None):
                raise ObjectNotFound(f"no object {where}") from e
            if code in ("AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch") \
                    or status == 403:
                raise StorageError(f"{what} {where}: access denied ({code}: {message}); check "
                                   "HOTSWAP_S3_ACCESS_KEY_ID / HOTSWAP_S3_SECRET_ACCESS_KEY and the "
                                   f"bucket policy of {self.bucket!r}") from e
            raise StorageError(f"{what} {where} failed: {code or status}: {message}") from e
        except EndpointConnectionError as e:
            raise StorageError(f"{what} {where}: cannot reach the S3 endpoint "
                               f"{self.endpoint_url or '(AWS default)'}: {e}") from e
        except NoCredentialsError as e:
            raise StorageError(f"{what} {where}: no S3 credentials; set HOTSWAP_S3_ACCESS_KEY_ID and "
                               "HOTSWAP_S3_SECRET_ACCESS_KEY") from e
        except (BotoCoreError, Boto3Error) as e:
            raise StorageError(f"{what} {where} failed: {e}") from e

    # -- records

    def _read_record(self, key: str) -> ObjectInfo:
        with self._errors("reading the hash record of", key):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._full(_record_key(key)))
            raw = resp["Body"].read()
        return _decode_record(key, raw, self._where(key))

    def _write_record(self, info: ObjectInfo) -> None:
        with self._errors("writing the hash record of", info.key):
            self._client.put_object(Bucket=self.bucket, Key=self._full(_record_key(info.key)),
                                    Body=_encode_record(info), ContentType="application/json")

    def _delete_record(self, key: str, what: str = "deleting the hash record of") -> None:
        with self._errors(what, key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full(_record_key(key)))

    # -- data

    def _open_data(self, key: str, chunk_size: int) -> tuple[int, Iterator[bytes], Callable[[], None]]:
        with self._errors("reading", key):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
        body = resp["Body"]

        def chunks() -> Iterator[bytes]:
            while True:
                with self._errors("reading", key):
                    chunk = body.read(chunk_size)
                if not chunk:
                    return
                yield chunk

        return int(resp["ContentLength"]), chunks(), body.close

    def put_stream(self, key: str, stream: BinaryIO) -> ObjectInfo:
        _check_key(key)
        self._delete_record(key, "uploading")  # an overwrite is a delete, then a create
        reader = _HashingReader(stream)
        with self._errors("uploading", key):
            self._client.upload_fileobj(reader, self.bucket, self._full(key), Config=self._transfer)
        info = reader.info(key)
        self._write_record(info)
        return info

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        if len(data) >= self._threshold:
            return super().put_bytes(key, data)
        _check_key(key)
        info = ObjectInfo(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        self._delete_record(key, "uploading")
        with self._errors("uploading", key):
            self._client.put_object(Bucket=self.bucket, Key=self._full(key),
                                    Body=data if isinstance(data, bytes) else bytes(data))
        self._write_record(info)
        return info

    def info(self, key: str) -> ObjectInfo:
        _check_key(key)
        record = self._read_record(key)  # a GET first: unlike HEAD it tells a missing bucket apart
        with self._errors("inspecting", key):
            head = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        if int(head["ContentLength"]) != record.size:
            raise IntegrityError(f"{self._where(key)} has {head['ContentLength']} bytes, {record.size} recorded")
        return record

    def delete(self, key: str) -> None:
        _check_key(key)
        self._delete_record(key)
        with self._errors("deleting", key):
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def _list_keys(self, prefix: str) -> Iterator[str]:
        """Keys (relative to the store root) of every raw object starting with prefix."""
        root = self._full("")
        paginator = self._client.get_paginator("list_objects_v2")
        with self._errors("listing", None):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(root):]

    def _scan(self, prefix: str) -> tuple[set[str], set[str]]:
        """(keys with data, keys with a hash record) under prefix."""
        data = {k for k in self._list_keys(prefix) if not k.startswith(META_PREFIX)}
        records = {k[len(META_PREFIX):-len(RECORD_SUFFIX)]
                   for k in self._list_keys(META_PREFIX + prefix) if k.endswith(RECORD_SUFFIX)}
        return data, records

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        _check_prefix(prefix)
        data, records = self._scan(prefix)
        keys = sorted(data & records)
        if not keys:
            return []

        def read(key: str) -> ObjectInfo | None:
            try:
                return self._read_record(key)
            except ObjectNotFound:  # deleted meanwhile
                return None

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
            return [info for info in pool.map(read, keys) if info is not None]

    def _delete_many(self, full_keys: list[str]) -> None:
        for i in range(0, len(full_keys), 1000):
            batch = full_keys[i:i + 1000]
            with self._errors("deleting under", None):
                resp = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            if resp.get("Errors"):
                first = resp["Errors"][0]
                raise StorageError(f"deleting {len(resp['Errors'])} objects under {self.url} failed, e.g. "
                                   f"{first.get('Key')}: {first.get('Code')}: {first.get('Message')}")

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to empty the whole store)")
        _check_prefix(prefix)
        data, records = self._scan(prefix)
        self._delete_many([self._full(_record_key(k)) for k in sorted(records)])  # records first
        self._delete_many([self._full(k) for k in sorted(data)])
        return len(data & records)

    def presigned_url(self, key: str, expires_s: int | None = None) -> str | None:
        """A presigned GET of the raw bytes (no I/O here). Whoever downloads it should check the
        bytes against info(key).sha256: the URL itself cannot verify anything."""
        _check_key(key)
        with self._errors("presigning", key):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._full(key)},
                ExpiresIn=int(expires_s if expires_s is not None else self._presign_expiry_s))


# ---------------------------------------------------------------------------------------------


def open_store(settings: Settings | None = None, url: str | None = None) -> ObjectStore:
    """The store at `url`, or at settings.resolved_storage_url (settings default: get_settings())."""
    if url is None or url.startswith("s3://"):
        if settings is None:
            from hotswap.settings import get_settings

            settings = get_settings()
        url = url or settings.resolved_storage_url
    if url.startswith("s3://"):
        return S3Store(url, settings)
    if url.startswith("file://"):
        return FileStore(url)
    raise ValueError(f"unsupported storage URL {url!r}: expected s3://bucket/prefix or file:///dir")
