"""adapters.cache: the worker's adapter disk cache, against real file:// storage (and Redis + PEFT end to end).

Stores are wrapped in small counting/slow/corrupting wrapper objects around the real store (no mock
library); the cross-process test counts downloads in an append-only log file shared by the processes.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from adapters.cache import AdapterCache, CacheIntegrityError
from adapters.registry import FileRef, Record


def open_file_store(root: Path):
    from hotswap.storage import open_store

    return open_store(url=f"file://{root}")


class CountingStore:
    """A real store that counts (and optionally slows down or corrupts) downloads."""

    def __init__(self, store, delay: float = 0.0, corrupt: bool | int = False, log_path: str | None = None):
        # corrupt: True = every download, an int N = the first N downloads only (a flaky network)
        self._store, self.delay, self.corrupt, self.log_path = store, delay, corrupt, log_path
        self.downloads: list[str] = []
        self._lock = threading.Lock()

    def download(self, key, dest):
        with self._lock:
            self.downloads.append(key)
        if self.log_path:  # one line per download, shared across processes (O_APPEND)
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                os.write(fd, f"{os.getpid()} {key}\n".encode())
            finally:
                os.close(fd)
        if self.delay:
            time.sleep(self.delay)
        info = self._store.download(key, dest)
        if self.corrupt is True or len(self.downloads) <= int(self.corrupt):  # bytes differ from storage's
            data = bytearray(Path(dest).read_bytes())
            data[len(data) // 2] ^= 0xFF
            Path(dest).write_bytes(bytes(data))
        return info

    def __getattr__(self, name):
        return getattr(self._store, name)


def make_record(store, name: str, files: dict[str, bytes], tenant: str = "acme", version: int = 1) -> Record:
    refs = {}
    for filename, data in files.items():
        key = f"tenants/{tenant}/models/{name}/v{version}/{filename}"
        store.put_bytes(key, data)
        refs[filename] = FileRef(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest())
    return Record(
        tenant=tenant, name=name, version=version, kind="lora", base_model="tiny", rank=8,
        target_modules=("q_proj",), alpha=16.0, use_rslora=False, size_bytes=sum(len(d) for d in files.values()),
        sha256=refs["adapter_model.safetensors"].sha256, weights_file="adapter_model.safetensors", files=refs,
        owner=tenant, created_at=time.time(),
    )


def adapter_files(seed: int, size: int = 1000) -> dict[str, bytes]:
    return {
        "adapter_config.json": f'{{"seed": {seed}}}'.encode(),
        "adapter_model.safetensors": os.urandom(size),
    }


@pytest.fixture
def store(tmp_path):
    return open_file_store(tmp_path / "storage")


def check_entry(path: Path, record: Record) -> None:
    assert sorted(p.name for p in path.iterdir()) == sorted(record.files)
    for filename, f in record.files.items():
        data = (path / filename).read_bytes()
        assert len(data) == f.size and hashlib.sha256(data).hexdigest() == f.sha256


# --------------------------------------------------------------------------------------------------
# Basics


def test_fetch_downloads_once(tmp_path, store):
    files = adapter_files(0)
    rec = make_record(store, "a", files)
    counting = CountingStore(store)
    cache = AdapterCache(tmp_path / "cache", 10_000, counting)
    assert rec not in cache and cache.size_bytes() == 0

    path = cache.fetch(rec)
    check_entry(path, rec)
    assert (path / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    assert len(counting.downloads) == 2
    assert rec in cache and rec.digest in cache and len(cache) == 1
    assert cache.size_bytes() == rec.size_bytes

    assert cache.fetch(rec) == path  # second fetch: no store access
    with cache.use(rec.model_dump()) as p2:  # a plain dict (as from a queue message) works too
        assert p2 == path
    assert len(counting.downloads) == 2

    # a new cache object on the same dir (a restarted worker) finds the entry
    again = CountingStore(store)
    assert AdapterCache(tmp_path / "cache", 10_000, again).fetch(rec) == path and again.downloads == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_same_content_shares_an_entry(tmp_path, store):
    files = adapter_files(0)
    a, b = make_record(store, "a", files), make_record(store, "b", files, tenant="other")
    counting = CountingStore(store)
    cache = AdapterCache(tmp_path / "cache", 10_000, counting)
    assert cache.fetch(a) == cache.fetch(b) and len(counting.downloads) == 2


# --------------------------------------------------------------------------------------------------
# LRU eviction


def test_lru_eviction(tmp_path, store):
    recs = [make_record(store, f"m{i}", adapter_files(i)) for i in range(4)]
    size = recs[0].size_bytes
    counting = CountingStore(store)
    cache = AdapterCache(tmp_path / "cache", int(size * 2.5), counting)  # room for two entries
    a, b, c, d = recs
    cache.fetch(a)
    cache.fetch(b)
    cache.fetch(a)  # a is now more recently used than b
    cache.fetch(c)  # over the cap: b (least recently used) goes
    assert a in cache and b not in cache and c in cache
    assert cache.size_bytes() == 2 * size
    cache.fetch(d)  # now a is the oldest
    assert [r in cache for r in recs] == [False, False, True, True]

    assert cache.evict_to(size) == size  # evict_to directly: drops c, the older
    assert [r in cache for r in recs] == [False, False, False, True]
    assert cache.evict_to(0) == size and cache.size_bytes() == 0 and len(cache) == 0


def test_entry_in_use_is_never_evicted(tmp_path, store):
    a, b, c = (make_record(store, f"m{i}", adapter_files(i)) for i in range(3))
    size = a.size_bytes
    cache = AdapterCache(tmp_path / "cache", int(size * 1.5), store)  # room for one entry
    with cache.use(a) as path_a:
        path_b = cache.fetch(b)  # over the cap, but a is in use and b was just filled (in use while filling)
        assert a in cache and b in cache
        assert cache.evict_to(0) == size  # only b can go
        assert a in cache and b not in cache and not path_b.exists()
        check_entry(path_a, a)
        with cache.use(c) as path_c:
            assert cache.evict_to(0) == 0  # both in use
            check_entry(path_c, c)
        check_entry(path_a, a)
    cache.fetch(b)  # a and c are free again: the fill evicts the least recently used ones
    assert [r in cache for r in (a, b, c)] == [False, True, False]


# --------------------------------------------------------------------------------------------------
# Concurrency


def test_two_threads_fetch_once(tmp_path, store):
    rec = make_record(store, "a", adapter_files(0, size=200_000))
    counting = CountingStore(store, delay=0.2)
    caches = [AdapterCache(tmp_path / "cache", 10_000_000, counting) for _ in range(2)]
    barrier = threading.Barrier(2)
    paths, errors = [], []

    def worker(cache):
        try:
            barrier.wait()
            with cache.use(rec) as path:
                check_entry(path, rec)  # complete the moment we get it
                paths.append(path)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(paths) == 2 and paths[0] == paths[1]
    assert sorted(counting.downloads) == sorted(f.key for f in rec.files.values())  # once each


def _fetch_in_process(cache_root, storage_root, log_path, record_json, barrier, results):
    """Runs in a spawned process: fetch the record through a counting store, report what it saw."""
    try:
        rec = Record.model_validate_json(record_json)
        counting = CountingStore(open_file_store(Path(storage_root)), delay=0.3, log_path=log_path)
        cache = AdapterCache(Path(cache_root), 10_000_000, counting)
        barrier.wait(timeout=60)
        with cache.use(rec) as path:
            shas = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}
        results.put((os.getpid(), str(path), shas))
    except BaseException as exc:  # noqa: BLE001
        results.put((os.getpid(), "error", repr(exc)))


def test_two_processes_fetch_once(tmp_path, store):
    rec = make_record(store, "a", adapter_files(0, size=200_000))
    log_path = tmp_path / "downloads.log"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(tmp_path / "cache"), str(tmp_path / "storage"), str(log_path), rec.model_dump_json(), barrier,
            results)
    procs = [ctx.Process(target=_fetch_in_process, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    expected = {name: f.sha256 for name, f in rec.files.items()}
    for pid, path, shas in got:
        assert path != "error", shas
        assert shas == expected
    assert got[0][1] == got[1][1]
    lines = log_path.read_text().splitlines()
    assert sorted(line.split()[1] for line in lines) == sorted(f.key for f in rec.files.values())  # read once


# --------------------------------------------------------------------------------------------------
# Integrity


def test_corrupted_download_leaves_no_entry(tmp_path, store):
    rec = make_record(store, "a", adapter_files(0))
    cache = AdapterCache(tmp_path / "cache", 10_000, CountingStore(store, corrupt=True))
    with pytest.raises(CacheIntegrityError, match="sha256"):
        cache.fetch(rec)
    assert rec not in cache and len(cache) == 0 and cache.size_bytes() == 0
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    # the same cache dir with a healthy store works
    check_entry(AdapterCache(tmp_path / "cache", 10_000, store).fetch(rec), rec)


def test_a_checksum_mismatch_is_fetched_again(tmp_path, store):
    rec = make_record(store, "a", adapter_files(0))
    flaky = CountingStore(store, corrupt=1)  # only the first download arrives corrupted
    cache = AdapterCache(tmp_path / "cache", 10_000, flaky)
    check_entry(cache.fetch(rec), rec)
    assert len(flaky.downloads) == len(rec.files) + 1  # the corrupted file came twice, the fill retried


def test_an_entry_corrupted_on_disk_is_detected_and_fetched_again(tmp_path, store):
    rec = make_record(store, "a", adapter_files(0))
    counting = CountingStore(store)
    path = AdapterCache(tmp_path / "cache", 10_000, counting).fetch(rec)
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF  # same size: only the hash can tell
    weights.write_bytes(bytes(data))
    fresh = AdapterCache(tmp_path / "cache", 10_000, counting)  # e.g. the worker restarted
    check_entry(fresh.fetch(rec), rec)
    assert len(counting.downloads) == 2 * len(rec.files)


def test_record_disagreeing_with_storage_is_refused(tmp_path, store):
    rec = make_record(store, "a", adapter_files(0))
    store.put_bytes(rec.files["adapter_model.safetensors"].key, os.urandom(1000))  # replaced behind its back
    cache = AdapterCache(tmp_path / "cache", 10_000, store)
    with pytest.raises(CacheIntegrityError, match="record"):
        cache.fetch(rec)
    assert rec not in cache and list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_leftovers_of_a_crashed_fill_are_cleaned(tmp_path, store):
    rec = make_record(store, "a", adapter_files(0))
    stale = tmp_path / "cache" / "tmp" / f"{rec.digest}.fill.abc123"
    stale.mkdir(parents=True)
    (stale / "adapter_config.json").write_text("{")
    cache = AdapterCache(tmp_path / "cache", 10_000, store)
    assert not stale.exists()
    check_entry(cache.fetch(rec), rec)


def test_fill_in_progress_elsewhere_is_not_cleaned(tmp_path, store):
    """A temp dir whose entry lock is held (another worker is downloading into it) survives a new cache."""
    import fcntl

    rec = make_record(store, "a", adapter_files(0))
    AdapterCache(tmp_path / "cache", 10_000, store)
    busy = tmp_path / "cache" / "tmp" / f"{rec.digest}.fill.busy"
    busy.mkdir()
    fd = os.open(tmp_path / "cache" / "locks" / f"{rec.digest}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        AdapterCache(tmp_path / "cache", 10_000, store)
        assert busy.exists()
    finally:
        os.close(fd)
    AdapterCache(tmp_path / "cache", 10_000, store)
    assert not busy.exists()


# --------------------------------------------------------------------------------------------------
# End to end: registry -> cache -> adapters.format


def test_registered_adapter_fetched_and_inspected(tmp_path, store, redis_client):
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters.format import inspect_lora_adapter
    from adapters.registry import Registry

    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=256)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / "src")
    info = inspect_lora_adapter(tmp_path / "src", cfg.to_dict())
    rec = Registry(redis_client, store).register("acme", "e2e", "lora", "tiny", tmp_path / "src", info)

    resolved = Registry(redis_client, store).resolve("acme", "e2e")
    cache = AdapterCache(tmp_path / "cache", 1 << 20, store)
    with cache.use(resolved) as path:
        check_entry(path, rec)
        got = inspect_lora_adapter(path, cfg.to_dict())
    assert (got.rank, got.alpha, got.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
