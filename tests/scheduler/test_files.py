"""scheduler.batchjobs.files.FileCatalog against a real Redis server and real object storage (file:// and moto
S3 over HTTP): layout, ordering, tenant isolation, and no record ever pointing at a missing blob."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from scheduler.batchjobs.files import FILE_ID, FileCatalog, FileNotFound, FileRecord, new_file_id
from hotswap.storage import FileStore, IntegrityError, open_store

LINES = b'{"custom_id": "a"}\n{"custom_id": "b"}\n'


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(f"file://{tmp_path / 'store'}")
    return open_store(request.getfixturevalue("s3_settings"))


@pytest.fixture
def catalog(redis_client, store) -> FileCatalog:
    return FileCatalog(redis_client, store)


def test_create_get_read(catalog, redis_client, store, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(LINES)
    for source in (LINES, path, io.BytesIO(LINES)):
        record = catalog.create("acme", "batch", "in.jsonl", source)
        assert FILE_ID.fullmatch(record.id)
        assert (record.bytes, record.filename, record.purpose, record.status) == (len(LINES), "in.jsonl", "batch",
                                                                                  "processed")
        assert catalog.get("acme", record.id) == record
        assert catalog.read_bytes("acme", record.id) == LINES
        # The documented layout: blob under the tenant's prefix, record in the tenant's hash.
        assert record.storage_key == f"tenants/acme/files/{record.id}/in.jsonl"
        assert store.get_bytes(record.storage_key) == LINES
        stored = json.loads(redis_client.hget("hotswap:files:acme", record.id))
        assert stored["tenant"] == "acme" and stored["storage_key"] == record.storage_key


def test_public_json_hides_internals(catalog):
    from openai.types import FileObject

    body = catalog.create("acme", "batch_output", "output.jsonl", LINES).to_openai()
    assert not {"tenant", "storage_key", "sha256"} & set(body)
    parsed = FileObject.model_validate(body)
    assert parsed.object == "file" and parsed.purpose == "batch_output" and not parsed.model_extra


def test_ids_sort_by_time_and_created_at_matches():
    a, b = new_file_id(1_000_000), new_file_id(2_000_000)
    assert FILE_ID.fullmatch(a) and a < b
    assert new_file_id() != new_file_id()


def test_list_newest_first_with_filters_and_cursor(catalog):
    ids = [catalog.create("acme", "batch" if i % 2 == 0 else "batch_output", f"f{i}.jsonl", LINES).id
           for i in range(5)]
    newest_first = ids[::-1]
    assert [r.id for r in catalog.list("acme")] == newest_first
    assert [r.id for r in catalog.list("acme", purpose="batch")] == [ids[4], ids[2], ids[0]]
    assert [r.id for r in catalog.list("acme", limit=2)] == newest_first[:2]
    assert [r.id for r in catalog.list("acme", after=ids[3])] == [ids[2], ids[1], ids[0]]
    catalog.delete("acme", ids[3])  # a cursor still works after its own file is gone
    assert [r.id for r in catalog.list("acme", after=ids[3], limit=2)] == [ids[2], ids[1]]
    assert catalog.list("acme", after=ids[0]) == []


def test_tenants_never_see_each_other(catalog, redis_client):
    record = catalog.create("acme", "batch", "in.jsonl", LINES)
    catalog.create("globex", "batch", "theirs.jsonl", b'{"x": 1}\n')
    with pytest.raises(FileNotFound):
        catalog.get("globex", record.id)
    with pytest.raises(FileNotFound):
        catalog.open("globex", record.id)
    with pytest.raises(FileNotFound):
        catalog.presigned_url("globex", record.id)
    with pytest.raises(FileNotFound):
        catalog.delete("globex", record.id)
    assert [r.filename for r in catalog.list("globex")] == ["theirs.jsonl"]
    assert [r.id for r in catalog.list("acme")] == [record.id]
    assert catalog.read_bytes("acme", record.id) == LINES  # untouched by globex's attempts
    assert set(redis_client.keys("hotswap:files:*")) == {b"hotswap:files:acme", b"hotswap:files:globex"}


@pytest.mark.parametrize("file_id", ["file-nope", "", "file-" + "0" * 24, "../file", "file-" + "A" * 24])
def test_unknown_ids(catalog, file_id):
    catalog.create("acme", "batch", "in.jsonl", LINES)
    with pytest.raises(FileNotFound):
        catalog.get("acme", file_id)


def test_delete_removes_record_then_blob(catalog, store):
    record = catalog.create("acme", "batch", "in.jsonl", LINES)
    assert catalog.delete("acme", record.id) == record
    assert store.list(f"tenants/acme/files/{record.id}/") == []
    with pytest.raises(FileNotFound):
        catalog.get("acme", record.id)
    with pytest.raises(FileNotFound):
        catalog.delete("acme", record.id)


def test_failed_record_write_leaves_no_blob(store):
    """Redis down after the blob is written: the blob is removed, so nothing is orphaned."""
    import redis

    from tests.servers import free_port

    dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        FileCatalog(dead, store).create("acme", "batch", "in.jsonl", LINES)
    assert store.list("tenants/acme/") == []


@pytest.mark.parametrize("filename, segment", [
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\me\\batch input.jsonl", "batch_input.jsonl"),
    (".hidden.jsonl", "hidden.jsonl"),
    ("données/été 2.jsonl", "ete_2.jsonl"),
    ("名前.jsonl", "jsonl"),
    ("...", "file"),
])
def test_filenames_become_safe_keys(catalog, filename, segment):
    record = catalog.create("acme", "batch", filename, LINES)
    assert record.storage_key == f"tenants/acme/files/{record.id}/{segment}"
    assert record.filename == filename  # shown to the user as they sent it
    assert catalog.read_bytes("acme", record.id) == LINES


def test_bad_purpose_and_tenant(catalog):
    with pytest.raises(ValueError, match="purpose"):
        catalog.create("acme", "fine-tune", "in.jsonl", LINES)
    for tenant in ("", "a:b", "a/b"):
        with pytest.raises(ValueError, match="tenant"):
            catalog.create(tenant, "batch", "in.jsonl", LINES)


def test_iter_lines(catalog):
    data = b"".join(b'{"i": %d}\n' % i for i in range(1000)) + b'{"last": true}'
    record = catalog.create("acme", "batch", "in.jsonl", data)
    lines = list(catalog.iter_lines("acme", record.id))
    assert len(lines) == 1001 and b"".join(lines) == data and lines[-1] == b'{"last": true}'
    # Lines across the store's 1 MiB chunks, one longer than a chunk.
    data = b"a" * 1000 + b"\n" + b"b" * (3 << 19) + b"\n" + b"c\n" * 300_000
    record = catalog.create("acme", "batch", "big.jsonl", data)
    lines = list(catalog.iter_lines("acme", record.id))
    assert len(lines) == 300_002 and b"".join(lines) == data and len(lines[1]) == (3 << 19) + 1


def test_corrupted_blob_is_never_served(tmp_path, redis_client):
    store = FileStore(f"file://{tmp_path / 'store'}")
    catalog = FileCatalog(redis_client, store)
    record = catalog.create("acme", "batch", "in.jsonl", LINES)
    (store.root / record.storage_key).write_bytes(LINES.replace(b"a", b"z"))
    with pytest.raises(IntegrityError):
        catalog.read_bytes("acme", record.id)


def test_presigned_url(catalog, store):
    record = catalog.create("acme", "batch", "in.jsonl", LINES)
    url = catalog.presigned_url("acme", record.id, 120)
    if isinstance(store, FileStore):
        assert url is None
    else:
        assert httpx.get(url).content == LINES


def test_record_roundtrip():
    record = FileRecord(id=new_file_id(), bytes=1, created_at=2, filename="f", purpose="batch", tenant="t",
                        storage_key="k", sha256="0" * 64)
    assert FileRecord.model_validate_json(record.model_dump_json()) == record
