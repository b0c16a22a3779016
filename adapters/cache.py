"""The worker-side adapter disk cache: registry records -> local dirs, filled from object storage on first use.

    cache = AdapterCache(settings.resolved_adapter_cache_dir, int(settings.adapter_cache_gb * 2**30), store)
    with cache.use(record) as path:      # path stays on disk while the block runs
        info = inspect_lora_adapter(path, base_config)
        ...load the weights...
    path = cache.fetch(record)          # same, without the protection against eviction afterwards

Layout under `root`::

    entries/{digest}/{filename}...   one complete entry per record content (original file names)
    locks/{digest}.lock              the entry's lock file (flock); never deleted, they are tiny
    tmp/{digest}.fill.XXXX/          a download in progress (renamed to entries/{digest} when complete)
    tmp/{digest}.trash.XXXX/         an evicted entry being removed

Entries are keyed by the record's content digest (`Record.digest`: sha256 over every file's name, size
and sha256), not by tenant/name/version: the same bytes registered twice share one entry, and an entry
can never be stale because a digest's content never changes.

Concurrency (threads and processes alike: every use opens its own descriptor of the lock file, and
flock locks belong to open file descriptions): a user holds a *shared* flock on the entry's lock file
for as long as it uses the entry; filling takes it *exclusively*, so one filler downloads while the
others wait, then find the entry complete. A fill downloads into a temp dir and `os.rename`s it into
place, so an entry dir exists only when complete. Eviction takes each candidate's lock exclusively
*without blocking* and skips entries it cannot lock, so an entry in use is never evicted; it renames
the entry into tmp/ (gone at once) before deleting it.

Integrity: `store.download` verifies sha256 itself; the cache also checks the size and sha256 the store
reports and re-hashes every final file against the record before the entry becomes visible. Any
mismatch raises `CacheIntegrityError` and leaves no entry.

LRU: an entry's dir mtime is its last use (set with nanosecond wall-clock time at the start and end of
every use). After a fill pushes the total over `max_bytes`, the least recently used unlocked entries are
evicted until the total fits (entries in use may keep it over the cap until they are released).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from adapters.registry import Record
from hotswap.storage import IntegrityError

__all__ = ["AdapterCache", "CacheIntegrityError"]

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


class CacheIntegrityError(RuntimeError):
    """A downloaded file does not match the record (size or sha256): nothing was cached."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _as_record(record: Record | Mapping[str, Any] | str | bytes) -> Record:
    if isinstance(record, Record):
        return record
    if isinstance(record, (str, bytes)):
        return Record.model_validate_json(record)
    return Record.model_validate(record)


def _touch(path: Path) -> None:
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:
        pass


class AdapterCache:
    def __init__(self, root: str | Path, max_bytes: int, store: Any):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.store = store
        self._entries = self.root / "entries"
        self._locks = self.root / "locks"
        self._tmp = self.root / "tmp"
        self._verified: set[str] = set()  # digests whose files this object has hashed and found good
        for d in (self._entries, self._locks, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    @classmethod
    def from_settings(cls, store: Any, settings: Any = None) -> "AdapterCache":
        from hotswap.settings import get_settings

        settings = settings or get_settings()
        return cls(settings.resolved_adapter_cache_dir, int(settings.adapter_cache_gb * (1 << 30)), store)

    # ---- locks

    def _open_lock(self, digest: str) -> int:
        return os.open(self._locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    @staticmethod
    def _try_lock(fd: int, how: int) -> bool:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise

    def _clean_tmp(self) -> None:
        """Remove leftovers of crashed fills (whose entry lock nobody holds) and of interrupted evictions."""
        for p in self._tmp.iterdir():
            digest, _, kind = p.name.partition(".")
            if kind.startswith("fill."):
                fd = self._open_lock(digest)
                try:
                    if not self._try_lock(fd, fcntl.LOCK_EX):
                        continue  # being filled right now by someone else
                    shutil.rmtree(p, ignore_errors=True)
                finally:
                    os.close(fd)
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ---- entries

    def path_for(self, record: Record | Mapping[str, Any]) -> Path:
        """Where the record's entry lives (whether or not it is there)."""
        return self._entries / _as_record(record).digest

    @staticmethod
    def _complete(entry: Path, record: Record) -> bool:
        try:
            return all((entry / name).stat().st_size == f.size for name, f in record.files.items())
        except OSError:
            return False

    def _valid(self, entry: Path, record: Record) -> bool:
        """Complete, and its files hash to the record's (hashed once per entry per cache object, so
        an entry corrupted on disk is caught and fetched again before anyone loads it)."""
        if not self._complete(entry, record):
            return False
        if record.digest in self._verified:
            return True
        for name, f in record.files.items():
            if _sha256_file(entry / name) != f.sha256:
                log.warning("cached %s/%s: %s fails its checksum; fetching it again", record.tenant, record.ref, name)
                return False
        self._verified.add(record.digest)
        return True

    def __contains__(self, record: object) -> bool:
        if isinstance(record, str) and len(record) == 64:
            return (self._entries / record).is_dir()
        try:
            rec = _as_record(record)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001
            return False
        return self._complete(self._entries / rec.digest, rec)

    def _entry_dirs(self) -> list[Path]:
        try:
            return [p for p in self._entries.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    @staticmethod
    def _dir_bytes(entry: Path) -> int:
        total = 0
        try:
            for f in entry.iterdir():
                try:
                    total += f.stat().st_size
                except FileNotFoundError:
                    pass
        except FileNotFoundError:
            pass
        return total

    def size_bytes(self) -> int:
        """Bytes of all complete entries."""
        return sum(self._dir_bytes(e) for e in self._entry_dirs())

    def __len__(self) -> int:
        return len(self._entry_dirs())

    # ---- fill

    def _fill(self, record: Record, entry: Path) -> None:
        """Download every file into a temp dir, verify, fsync, rename into place. Caller holds the EX lock."""
        tmp = Path(tempfile.mkdtemp(prefix=f"{record.digest}.fill.", dir=self._tmp))
        try:
            for filename, f in record.files.items():
                if Path(filename).name != filename or filename in ("", ".", ".."):
                    raise CacheIntegrityError(f"record {record.ref} has a bad file name {filename!r}")
                dest = tmp / filename
                info = self.store.download(f.key, dest)
                got_size = getattr(info, "size", None)
                got_sha = getattr(info, "sha256", None)
                if (got_size is not None and got_size != f.size) or (got_sha is not None and got_sha != f.sha256):
                    raise CacheIntegrityError(
                        f"{f.key}: storage holds {got_size} bytes with sha256 {got_sha}, but record "
                        f"{record.tenant}/{record.ref} says {f.size} bytes with sha256 {f.sha256}"
                    )
                size = dest.stat().st_size
                sha = _sha256_file(dest)
                if size != f.size or sha != f.sha256:
                    raise CacheIntegrityError(
                        f"{f.key}: downloaded {size} bytes with sha256 {sha}, but record "
                        f"{record.tenant}/{record.ref} says {f.size} bytes with sha256 {f.sha256}"
                    )
                with open(dest, "rb") as fh:
                    os.fsync(fh.fileno())
            if entry.exists():  # an incomplete dir someone tampered with: replace it
                self._discard(entry)
            os.rename(tmp, entry)
            dir_fd = os.open(self._entries, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("cached %s/%s (%d bytes) in %s", record.tenant, record.ref, record.size_bytes, entry)

    def _fill_with_retries(self, record: Record, entry: Path, attempts: int = 3) -> None:
        """A download that fails its checksum (a flaky network or store) is fetched again."""
        for attempt in range(1, attempts + 1):
            try:
                return self._fill(record, entry)
            except (CacheIntegrityError, IntegrityError) as exc:
                if attempt == attempts:
                    raise
                log.warning("fetching %s/%s failed its checksum (%s); retrying", record.tenant, record.ref, exc)

    def _discard(self, entry: Path) -> None:
        """Make the entry disappear at once (rename into tmp/), then delete it."""
        trash = self._tmp / f"{entry.name}.trash.{uuid.uuid4().hex}"
        os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ---- use

    @contextmanager
    def use(self, record: Record | Mapping[str, Any]) -> Iterator[Path]:
        """Yield the local dir of the record's files, filling it first if needed; never evicted while in use."""
        record = _as_record(record)
        digest = record.digest
        entry = self._entries / digest
        fd = self._open_lock(digest)
        try:
            filled = False
            while True:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._valid(entry, record):
                    break
                # Upgrade to exclusive (not atomic: re-check after), fill, then go back to shared and
                # re-check, since an evictor may slip in between the two locks.
                fcntl.flock(fd, fcntl.LOCK_UN)
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not self._valid(entry, record):
                    self._fill_with_retries(record, entry)
                    self._verified.add(digest)  # _fill hashed every file
                    filled = True
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._complete(entry, record):
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)
            _touch(entry)
            if filled:
                self._evict_if_needed()
            yield entry
            _touch(entry)
        finally:
            os.close(fd)  # releases the lock

    def fetch(self, record: Record | Mapping[str, Any]) -> Path:
        """The local dir of the record's files (filled on first use). Not protected against a later
        eviction: hold `use(record)` while reading the files if other fills may run meanwhile."""
        with self.use(record) as path:
            return path

    # ---- eviction

    def _evict_if_needed(self) -> None:
        try:
            if self.size_bytes() > self.max_bytes:
                self.evict_to(self.max_bytes)
        except Exception:  # noqa: BLE001 - a failed eviction must not fail the request that filled
            log.exception("adapter cache eviction failed")

    def evict_to(self, max_bytes: int) -> int:
        """Evict least recently used entries not in use until the total is <= max_bytes; return bytes freed."""
        candidates = []
        for entry in self._entry_dirs():
            try:
                candidates.append((entry.stat().st_mtime_ns, entry))
            except FileNotFoundError:
                continue
        candidates.sort()
        sizes = {entry: self._dir_bytes(entry) for _, entry in candidates}
        total = sum(sizes.values())
        freed = 0
        for _, entry in candidates:
            if total <= max_bytes:
                break
            fd = self._open_lock(entry.name)
            try:
                if not self._try_lock(fd, fcntl.LOCK_EX):
                    continue  # in use (or being filled): never evicted
                gone = not entry.is_dir()  # evicted by someone else meanwhile
                if not gone:
                    self._discard(entry)
            finally:
                os.close(fd)
            total -= sizes[entry]
            if not gone:
                freed += sizes[entry]
                log.info("evicted %s (%d bytes) from the adapter cache", entry.name, sizes[entry])
        return freed
