"""adapters.registry against a real Redis server and real object storage (file:// and moto S3).

The adapters are real PEFT LoRA adapters (and transformers checkpoints) of a tiny random Llama, made
the same way as in test_format.py, validated by adapters.format before they are registered.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import warnings
from pathlib import Path

import pytest

from adapters.errors import MissingFileError
from adapters.format import inspect_full_checkpoint, inspect_lora_adapter
from adapters.names import NAME_RULE
from adapters.registry import Deleted, NotFound, Record, Registry, RegistryError

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=256,
)
BASE = "tiny-llama"


def tiny_model(**overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def make_adapter(dest: Path, seed: int = 0, **lora) -> Path:
    """A real PEFT LoRA adapter of the tiny Llama (B non-zero)."""
    import torch
    from peft import LoraConfig, get_peft_model

    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    lora.setdefault("init_lora_weights", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model()
        torch.manual_seed(seed)
        get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora)).save_pretrained(dest)
    return dest


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_file_store(root: Path):
    from hotswap.storage import open_store

    return open_store(url=f"file://{root}")


def stored_keys(store) -> list[str]:
    return sorted(o.key for o in store.list("tenants/"))


@pytest.fixture(scope="module")
def base_config() -> dict:
    from transformers import LlamaConfig

    return LlamaConfig(**TINY).to_dict()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("lora") / "adapter", r=8, lora_alpha=16)


@pytest.fixture(scope="module")
def lora_info(lora_dir, base_config):
    return inspect_lora_adapter(lora_dir, base_config)


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("full") / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model().save_pretrained(d, max_shard_size="40KB")
    (d / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    (d / "README.md").write_text("not uploaded")
    return d


@pytest.fixture
def file_store(tmp_path):
    return open_file_store(tmp_path / "storage")


@pytest.fixture
def registry(redis_client, file_store):
    return Registry(redis_client, file_store)


@pytest.fixture(params=["file", "s3"])
def any_registry(request, redis_client, tmp_path):
    if request.param == "file":
        store = open_file_store(tmp_path / "storage")
    else:
        from hotswap.storage import open_store

        store = open_store(request.getfixturevalue("s3_settings"))
    return Registry(redis_client, store)


# --------------------------------------------------------------------------------------------------
# The life cycle, on both storage backends


def test_register_resolve_delete_lifecycle(any_registry, lora_dir, lora_info):
    reg, store = any_registry, any_registry.store
    r1 = reg.register("acme", "sql-helper", "lora", BASE, lora_dir, lora_info)
    assert (r1.tenant, r1.name, r1.version, r1.kind, r1.base_model) == ("acme", "sql-helper", 1, "lora", BASE)
    assert reg.resolve("acme", "sql-helper") == r1
    assert reg.resolve("acme", "sql-helper@1") == r1
    assert reg.resolve("acme", "sql-helper@latest") == r1

    # blobs are where the record says, with the record's checksums
    for filename, f in r1.files.items():
        assert f.key == f"tenants/acme/models/sql-helper/v1/{filename}"
        info = store.info(f.key)
        assert (info.size, info.sha256) == (f.size, f.sha256) == ((lora_dir / filename).stat().st_size,
                                                                  sha256_file(lora_dir / filename))
        assert store.get_bytes(f.key) == (lora_dir / filename).read_bytes()

    r2 = reg.register("acme", "sql-helper", "lora", BASE, lora_dir, lora_info)
    assert r2.version == 2
    assert reg.resolve("acme", "sql-helper") == r2
    assert reg.resolve("acme", "sql-helper@1") == r1  # versions are immutable
    assert [r.version for r in reg.versions("acme", "sql-helper")] == [1, 2]

    marked = reg.delete("acme", "sql-helper@2")
    assert [r.version for r in marked] == [2] and marked[0].deleted and marked[0].deleted_at
    assert reg.resolve("acme", "sql-helper") == r1
    with pytest.raises(Deleted, match="deleted") as exc_info:
        reg.resolve("acme", "sql-helper@2")
    assert str(exc_info.value) == "model 'sql-helper@2' was deleted; use 'sql-helper' for its latest version"
    # marking only: the record and its blobs stay for requests already queued with it
    assert reg.get("acme", "sql-helper", 2).deleted
    assert all(store.exists(f.key) for f in r2.files.values())

    reg.delete("acme", "sql-helper")
    with pytest.raises(NotFound) as exc_info:
        reg.resolve("acme", "sql-helper")
    assert isinstance(exc_info.value, KeyError) and isinstance(exc_info.value, Deleted)
    assert str(exc_info.value) == "model 'sql-helper' was deleted (all 2 version(s))"
    with pytest.raises(Deleted, match="deleted"):
        reg.resolve("acme", "sql-helper@1")
    assert reg.list("acme") == []
    assert reg.versions("acme", "sql-helper") == []
    assert [r.deleted for r in reg.versions("acme", "sql-helper", include_deleted=True)] == [True, True]
    with pytest.raises(Deleted, match="already deleted"):
        reg.delete("acme", "sql-helper")
    assert all(store.exists(f.key) for r in (r1, r2) for f in r.files.values())


def test_not_found_messages(registry, lora_dir, lora_info):
    with pytest.raises(NotFound) as exc_info:
        registry.resolve("acme", "nope")
    assert str(exc_info.value) == "no model named 'nope' for tenant 'acme'"
    registry.register("acme", "yes", "lora", BASE, lora_dir, lora_info)
    with pytest.raises(NotFound, match="'yes@7' not found"):
        registry.resolve("acme", "yes@7")
    with pytest.raises(NotFound, match="'yes@7' not found"):
        registry.delete("acme", "yes@7")
    with pytest.raises(NotFound):
        registry.get("acme", "yes", 2)
    with pytest.raises(ValueError, match="positive integer"):
        registry.resolve("acme", "yes@0")
    with pytest.raises(ValueError, match="invalid model name"):
        registry.resolve("acme", "Yes")


# --------------------------------------------------------------------------------------------------
# Records


def test_lora_record_fields_and_json(registry, redis_client, lora_dir, lora_info):
    rec = registry.register("acme", "a", "lora", BASE, lora_dir, lora_info)
    assert (rec.rank, rec.alpha, rec.use_rslora, rec.target_modules) == (8, 16.0, False, ("q_proj", "v_proj"))
    assert rec.scaling == 2.0 and rec.dtype == "float32"
    assert set(rec.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert rec.weights_file == "adapter_model.safetensors"
    assert rec.sha256 == sha256_file(lora_dir / "adapter_model.safetensors")
    assert rec.size_bytes == sum((lora_dir / f).stat().st_size for f in rec.files)
    assert rec.owner == "acme" and not rec.deleted and rec.deleted_at is None and rec.created_at > 0
    assert rec.ref == "a@1" and len(rec.digest) == 64
    # JSON round trip, and the documented Redis layout
    assert Record.model_validate_json(rec.model_dump_json()) == rec
    assert json.loads(rec.model_dump_json())["files"]["adapter_model.safetensors"]["sha256"] == rec.sha256
    assert Record.model_validate_json(redis_client.hget("hotswap:reg:acme:model:a", "1")) == rec
    assert int(redis_client.get("hotswap:reg:acme:model:a:next")) == 1
    assert redis_client.smembers("hotswap:reg:acme:names") == {b"a"}
    assert redis_client.smembers("hotswap:reg:tenants") == {b"acme"}


def test_full_checkpoint_record(registry, full_dir, base_config):
    info = inspect_full_checkpoint(full_dir, json.loads((full_dir / "config.json").read_text()))
    assert len(info.files) > 1  # sharded
    rec = registry.register("acme", "ft", "full", BASE, full_dir, info)
    expected = {"config.json", "model.safetensors.index.json", "tokenizer.json", *info.files}
    if (full_dir / "generation_config.json").exists():
        expected.add("generation_config.json")
    assert set(rec.files) == expected  # README.md is not uploaded
    assert rec.kind == "full" and rec.rank is None and rec.target_modules is None and rec.scaling is None
    assert rec.weights_file == "model.safetensors.index.json"
    assert rec.sha256 == sha256_file(full_dir / "model.safetensors.index.json")
    assert stored_keys(registry.store) == sorted(f"tenants/acme/models/ft/v1/{f}" for f in expected)


def test_kind_and_info_must_agree(registry, lora_dir, lora_info):
    with pytest.raises(TypeError, match="FullModelInfo"):
        registry.register("acme", "a", "full", BASE, lora_dir, lora_info)
    with pytest.raises(ValueError, match="kind must be"):
        registry.register("acme", "a", "qlora", BASE, lora_dir, lora_info)
    assert registry.redis.dbsize() == 0 and stored_keys(registry.store) == []


def test_list_sorted_latest(registry, lora_dir, lora_info):
    for name in ("zeta", "alpha", "mid", "alpha", "gone"):
        registry.register("acme", name, "lora", BASE, lora_dir, lora_info)
    registry.delete("acme", "gone")
    listed = registry.list("acme")
    assert [(r.name, r.version) for r in listed] == [("alpha", 2), ("mid", 1), ("zeta", 1)]


# --------------------------------------------------------------------------------------------------
# Tenants and names


def test_tenant_isolation(registry, lora_dir, lora_info):
    a1 = registry.register("tenant-a", "shared-name", "lora", BASE, lora_dir, lora_info)
    registry.register("tenant-a", "only-a", "lora", BASE, lora_dir, lora_info)
    with pytest.raises(NotFound):
        registry.resolve("tenant-b", "shared-name")
    with pytest.raises(NotFound):
        registry.resolve("tenant-b", "only-a@1")
    with pytest.raises(NotFound):
        registry.get("tenant-b", "only-a", 1)
    with pytest.raises(NotFound):
        registry.delete("tenant-b", "only-a")
    assert registry.list("tenant-b") == [] and registry.versions("tenant-b", "only-a", include_deleted=True) == []

    # tenant b's own "shared-name" is independent: own counter, own prefix, own deletes
    b1 = registry.register("tenant-b", "shared-name", "lora", BASE, lora_dir, lora_info)
    assert b1.version == 1 and b1.tenant == "tenant-b"
    assert all(f.key.startswith("tenants/tenant-b/") for f in b1.files.values())
    registry.delete("tenant-b", "shared-name")
    assert registry.resolve("tenant-a", "shared-name") == a1
    assert [r.name for r in registry.list("tenant-a")] == ["only-a", "shared-name"]


BAD_NAMES = ["../x", "A", "a/b", "", "x" * 64, "a..b", "-a"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_invalid_names_refused(registry, lora_dir, lora_info, bad):
    with pytest.raises(ValueError) as exc_info:
        registry.register("acme", bad, "lora", BASE, lora_dir, lora_info)
    assert NAME_RULE in str(exc_info.value)
    with pytest.raises(ValueError, match="tenant name"):
        registry.register(bad, "ok", "lora", BASE, lora_dir, lora_info)
    with pytest.raises(ValueError):
        registry.resolve("acme", bad)
    with pytest.raises(ValueError):
        registry.list(bad)
    assert registry.redis.dbsize() == 0 and stored_keys(registry.store) == []


# --------------------------------------------------------------------------------------------------
# Concurrency and failures


def test_concurrent_registration_gets_distinct_versions(registry, lora_dir, lora_info):
    barrier = threading.Barrier(8)
    results, errors = [], []

    def upload():
        try:
            barrier.wait()
            results.append(registry.register("acme", "hot", "lora", BASE, lora_dir, lora_info))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.version for r in results) == list(range(1, 9))
    assert [r.version for r in registry.versions("acme", "hot")] == list(range(1, 9))
    assert len(stored_keys(registry.store)) == 8 * 2
    assert registry.resolve("acme", "hot").version == 8


class FailingStore:
    """Wraps a real store; the Nth put_file writes the blob and then raises (a crash midway)."""

    def __init__(self, store, fail_at: int):
        self._store, self._fail_at, self.puts = store, fail_at, 0

    def put_file(self, key, path):
        self.puts += 1
        info = self._store.put_file(key, path)
        if self.puts == self._fail_at:
            raise ConnectionError(f"simulated storage failure after writing {key}")
        return info

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_failed_upload_leaves_nothing(redis_client, file_store, lora_dir, lora_info, fail_at):
    registry = Registry(redis_client, FailingStore(file_store, fail_at))
    with pytest.raises(ConnectionError, match="simulated"):
        registry.register("acme", "broken", "lora", BASE, lora_dir, lora_info)
    assert stored_keys(file_store) == []
    with pytest.raises(NotFound):
        registry.resolve("acme", "broken")
    assert registry.list("acme") == []
    assert redis_client.hlen("hotswap:reg:acme:model:broken") == 0
    # the failed attempt burned v1; the next upload works and gets v2
    good = Registry(redis_client, file_store).register("acme", "broken", "lora", BASE, lora_dir, lora_info)
    assert good.version == 2 and registry.resolve("acme", "broken") == good


def test_missing_source_file_uploads_nothing(registry, lora_dir, lora_info, tmp_path):
    d = Path(shutil.copytree(lora_dir, tmp_path / "partial"))
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="adapter_model.safetensors"):
        registry.register("acme", "partial", "lora", BASE, d, lora_info)
    assert registry.redis.dbsize() == 0 and stored_keys(registry.store) == []


def test_record_write_failure_removes_blobs(redis_client, file_store, lora_dir, lora_info):
    """Redis failing after the upload (the last step) also leaves no blobs behind."""

    class BrokenPipelineRedis:
        def __init__(self, client):
            self._client = client

        def pipeline(self, *a, **kw):
            raise ConnectionError("simulated redis failure")

        def __getattr__(self, name):
            return getattr(self._client, name)

    registry = Registry(BrokenPipelineRedis(redis_client), file_store)
    with pytest.raises(ConnectionError, match="simulated redis"):
        registry.register("acme", "x", "lora", BASE, lora_dir, lora_info)
    assert stored_keys(file_store) == []
    assert redis_client.hlen("hotswap:reg:acme:model:x") == 0


# --------------------------------------------------------------------------------------------------
# Purge


def test_purge(registry, redis_client, lora_dir, lora_info):
    r1 = registry.register("acme", "p", "lora", BASE, lora_dir, lora_info)
    r2 = registry.register("acme", "p", "lora", BASE, lora_dir, lora_info)
    with pytest.raises(RegistryError, match="not deleted"):
        registry.purge("acme", "p", 1)
    registry.delete("acme", "p@1")
    registry.purge("acme", "p", 1)
    with pytest.raises(NotFound):
        registry.get("acme", "p", 1)
    assert not any(registry.store.exists(f.key) for f in r1.files.values())
    assert all(registry.store.exists(f.key) for f in r2.files.values())
    assert registry.resolve("acme", "p") == r2

    registry.purge("acme", "p", 2, force=True)
    assert stored_keys(registry.store) == []
    assert not redis_client.exists("hotswap:reg:acme:model:p")
    assert redis_client.smembers("hotswap:reg:acme:names") == set()
    # version numbers are never reused
    assert registry.register("acme", "p", "lora", BASE, lora_dir, lora_info).version == 3
