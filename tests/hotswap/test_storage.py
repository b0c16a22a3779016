"""Object storage: every behaviour against both backends, FileStore in a temp dir and S3Store over
real HTTP against moto's S3 server (boto3 is never mocked)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotswap.storage import (FileStore, IntegrityError, ObjectInfo, ObjectNotFound, ObjectStore, S3Store,
                             StorageError, open_store, validate_key)

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "file":
        return FileStore(f"file://{tmp_path / 'store'}")
    return open_store(request.getfixturevalue("s3_settings"))


class Backdoor:
    """Reaches behind a store's back, at the documented layout: <root>/<key> and
    <root>/.meta/<key>.json, to simulate corruption and crashes."""

    def __init__(self, store):
        self.store = store
        if isinstance(store, S3Store):
            import boto3

            self.s3 = boto3.client("s3", endpoint_url=store.endpoint_url, aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")

    def _s3_key(self, rel: str) -> str:
        return f"{self.store.prefix}/{rel}"

    def put_data(self, key: str, data: bytes) -> None:
        if isinstance(self.store, S3Store):
            self.s3.put_object(Bucket=self.store.bucket, Key=self._s3_key(key), Body=data)
        else:
            path = self.store.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

    def delete_record(self, key: str) -> None:
        if isinstance(self.store, S3Store):
            self.s3.delete_object(Bucket=self.store.bucket, Key=self._s3_key(f".meta/{key}.json"))
        else:
            (self.store.root / ".meta" / f"{key}.json").unlink()

    def raw_keys(self) -> list[str]:
        if isinstance(self.store, S3Store):
            resp = self.s3.list_objects_v2(Bucket=self.store.bucket, Prefix=self.store.prefix + "/")
            return sorted(o["Key"][len(self.store.prefix) + 1:] for o in resp.get("Contents", ()))
        return sorted(p.relative_to(self.store.root).as_posix() for p in self.store.root.rglob("*") if p.is_file())


class OneWayStream(io.RawIOBase):
    """A non-seekable source (like a request body) that records the largest read asked of it."""

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)
        self.max_read = 0

    def readable(self):
        return True

    def read(self, n=-1):
        if n is None or n < 0:
            n = len(self._buf.getbuffer())
        self.max_read = max(self.max_read, n)
        return self._buf.read(n)


# ---------------------------------------------------------------------------------------------


def test_put_get_info_round_trip(store):
    data = b"hello adapters" * 1000
    info = store.put_bytes("adapters/a1/adapter.safetensors", data)
    assert info == ObjectInfo("adapters/a1/adapter.safetensors", len(data), sha(data))
    assert store.get_bytes("adapters/a1/adapter.safetensors") == data
    assert store.info("adapters/a1/adapter.safetensors") == info
    assert store.exists("adapters/a1/adapter.safetensors")
    assert not store.exists("adapters/a1/other")
    assert isinstance(store, ObjectStore)


def test_put_file_stream_and_empty(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    info = store.put_file("f/file.bin", src)
    assert info.sha256 == sha(src.read_bytes()) and info.size == 300_000
    assert store.get_bytes("f/file.bin") == src.read_bytes()

    info = store.put_stream("f/stream.bin", OneWayStream(b"streamed"))
    assert info == ObjectInfo("f/stream.bin", 8, sha(b"streamed"))
    assert store.get_bytes("f/stream.bin") == b"streamed"

    assert store.put_bytes("f/empty", b"") == ObjectInfo("f/empty", 0, sha(b""))
    assert store.get_bytes("f/empty") == b""
    assert list(store.iter_chunks("f/empty")) == []


def test_overwrite_replaces_data_and_hash(store):
    store.put_bytes("k", b"old")
    info = store.put_bytes("k", b"new content")
    assert info.sha256 == sha(b"new content")
    assert store.get_bytes("k") == b"new content"
    assert store.info("k") == info


def test_list_is_sorted_filtered_and_hides_records(store):
    keys = ["b/2", "a/1", "a/sub/3", "ab", "c"]
    for k in keys:
        store.put_bytes(k, k.encode())
    assert [i.key for i in store.list()] == sorted(keys)
    assert [i.key for i in store.list("a/")] == ["a/1", "a/sub/3"]
    assert [i.key for i in store.list("a")] == ["a/1", "a/sub/3", "ab"]  # plain string prefix, as in S3
    assert store.list("zzz/") == []
    assert all(i.sha256 == sha(i.key.encode()) and i.size == len(i.key) for i in store.list())
    assert not any(i.key.startswith(".meta") for i in store.list())
    with pytest.raises(ValueError):
        store.put_bytes(".meta/x", b"reserved")


def test_delete_is_idempotent_and_delete_prefix_counts(store):
    for k in ["run/1/a", "run/1/b", "run/12/c", "run/2/d"]:
        store.put_bytes(k, b"x")
    store.delete("run/2/d")
    store.delete("run/2/d")
    store.delete("never/existed")
    assert not store.exists("run/2/d")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("run/2/d")

    Backdoor(store).put_data("run/1/orphan", b"data without a record")
    assert store.delete_prefix("run/1/") == 2  # the orphan is swept but was never an object
    assert [i.key for i in store.list()] == ["run/12/c"]
    assert store.delete_prefix("run/1/") == 0
    assert store.delete_prefix("run") == 1
    assert store.list() == []
    assert Backdoor(store).raw_keys() == []  # no records, orphans or temp files left behind
    with pytest.raises(ValueError):
        store.delete_prefix("")


def test_multipart_upload_of_a_stream(tmp_path, request):
    """~12 MiB through put_stream with a 5 MiB threshold: S3 takes it in 3 parts, read in order."""
    data = os.urandom(12 * MiB + 12345)
    for backend in ("file", "s3"):
        if backend == "s3":
            settings = request.getfixturevalue("s3_settings").model_copy(update={"s3_multipart_threshold_mb": 5})
            store = open_store(settings)
        else:
            store = FileStore(tmp_path / "store")
        source = OneWayStream(data)
        info = store.put_stream("big/model.bin", source)
        assert info == ObjectInfo("big/model.bin", len(data), sha(data))
        assert source.max_read <= 5 * MiB  # read in pieces, never whole
        assert store.get_bytes("big/model.bin") == data
        assert store.info("big/model.bin") == info
        if backend == "s3":
            head = Backdoor(store).s3.head_object(Bucket=store.bucket, Key="hotswap/big/model.bin")
            assert head["ETag"].strip('"').endswith("-3")  # a multipart object of 3 parts


def test_download_streams_atomically(store, tmp_path):
    data = os.urandom(3 * MiB + 7)
    store.put_bytes("m/w.bin", data)
    dest = tmp_path / "out" / "nested" / "w.bin"
    assert store.download("m/w.bin", dest) == ObjectInfo("m/w.bin", len(data), sha(data))
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["w.bin"]

    missing = tmp_path / "out" / "missing.bin"
    with pytest.raises(ObjectNotFound):
        store.download("m/nope", missing)
    assert not missing.exists()

    # a failed (corrupt) download leaves the previous file untouched and no temp file behind
    Backdoor(store).put_data("m/w.bin", bytes(len(data)))
    with pytest.raises(IntegrityError):
        store.download("m/w.bin", dest)
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["w.bin"]


def test_iter_chunks(store):
    data = os.urandom(1000_003)
    store.put_bytes("c/blob", data)
    chunks = list(store.iter_chunks("c/blob", chunk_size=65536))
    assert b"".join(chunks) == data
    assert len(chunks) >= 16 and all(len(c) <= 65536 for c in chunks)
    with pytest.raises(ObjectNotFound):  # raised by the call itself, before any iteration
        store.iter_chunks("c/none")
    with store.iter_chunks("c/blob", 1000) as it:  # abandoning early is fine
        assert next(it) == data[:1000]


def test_corruption_is_detected_on_every_read(store):
    data = os.urandom(200_000)
    store.put_bytes("x/y", data)
    back = Backdoor(store)

    back.put_data("x/y", bytes(len(data)))  # same size, other bytes: only the hash can tell
    with pytest.raises(IntegrityError):
        store.get_bytes("x/y")
    got = []
    with pytest.raises(IntegrityError):
        for chunk in store.iter_chunks("x/y", chunk_size=50_000):
            got.append(chunk)
    assert b"".join(got) == bytes(len(data))  # every chunk came out, then the error

    back.put_data("x/y", b"short")  # other size
    with pytest.raises(IntegrityError):
        store.get_bytes("x/y")
    with pytest.raises(IntegrityError):
        store.info("x/y")

    store.put_bytes("x/y", data)  # writing it again heals it
    assert store.get_bytes("x/y") == data


def test_missing_object(store, tmp_path):
    for call in (lambda: store.get_bytes("no/such"), lambda: store.info("no/such"),
                 lambda: store.iter_chunks("no/such"), lambda: store.download("no/such", tmp_path / "d")):
        with pytest.raises(ObjectNotFound) as exc:
            call()
        assert isinstance(exc.value, KeyError) and isinstance(exc.value, StorageError)
        assert "no/such" in str(exc.value)
    assert not store.exists("no/such")


def test_data_without_hash_record_is_absent(store):
    """A crash between writing the data and its record must not expose unverified bytes."""
    store.put_bytes("p/q", b"payload")
    Backdoor(store).delete_record("p/q")
    assert not store.exists("p/q")
    assert store.list() == []
    with pytest.raises(ObjectNotFound):
        store.get_bytes("p/q")
    with pytest.raises(ObjectNotFound):
        store.info("p/q")

    Backdoor(store).put_data("p/never-recorded", b"data only")
    assert not store.exists("p/never-recorded")

    store.put_bytes("p/q", b"payload")
    assert store.get_bytes("p/q") == b"payload"


@pytest.mark.parametrize("key", ["../x", "a/../b", "/abs", "a//b", "", "a\\b", "a/./b", ".", "a/", "a\x00b", "a\nb"])
def test_validate_key_rejects(key):
    with pytest.raises(ValueError):
        validate_key(key)


def test_validate_key_accepts_and_stores_enforce(store):
    for ok in ["a", "a/b/c.safetensors", "adapters/9f86d081/v1/adapter_config.json", ".hidden/x", "a..b"]:
        assert validate_key(ok) == ok
    for bad in ["../escape", "a/../../b", "/etc/passwd"]:
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"x")
        with pytest.raises(ValueError):
            store.get_bytes(bad)


def test_presigned_url(store):
    store.put_bytes("share/me.bin", b"presigned bytes")
    url = store.presigned_url("share/me.bin", expires_s=120)
    if isinstance(store, FileStore):
        assert url is None
        return
    import httpx

    resp = httpx.get(url)
    assert resp.status_code == 200
    assert resp.content == b"presigned bytes" and sha(resp.content) == store.info("share/me.bin").sha256
    assert "X-Amz-Expires=120" in url
    assert "X-Amz-Expires=3600" in store.presigned_url("share/me.bin")


def test_missing_bucket_names_the_bucket(s3_settings):
    store = open_store(s3_settings, url="s3://no-such-bucket-4d1f/models")
    for call in (lambda: store.put_bytes("a", b"x"), lambda: store.get_bytes("a"), lambda: store.info("a"),
                 lambda: store.exists("a"), lambda: store.list(), lambda: store.put_stream("a", io.BytesIO(b"x"))):
        with pytest.raises(StorageError) as exc:
            call()
        assert not isinstance(exc.value, ObjectNotFound)
        assert "no-such-bucket-4d1f" in str(exc.value)


def test_unreachable_endpoint_is_a_storage_error(s3_settings):
    from tests.servers import free_port

    settings = s3_settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(StorageError, match="cannot reach"):
        open_store(settings).get_bytes("a")


def test_file_store_keys_cannot_escape_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = FileStore(f"file://{tmp_path / 'root'}")
    (store.root / "link").symlink_to(outside)
    with pytest.raises(ValueError):
        store.put_bytes("link/evil", b"x")
    assert list(outside.iterdir()) == []


def test_file_store_hides_temp_files_and_writes_atomically(tmp_path):
    store = FileStore(tmp_path / "s")
    store.put_bytes("d/k", b"v")
    (store.root / "d" / ".hotswap-tmp-leftover").write_bytes(b"partial write from a crash")
    assert [i.key for i in store.list()] == ["d/k"]
    assert Backdoor(store).raw_keys() == [".meta/d/k.json", "d/.hotswap-tmp-leftover", "d/k"]


def test_open_store_picks_the_backend(tmp_path, s3_settings):
    from hotswap.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", storage_url=None)
    store = open_store(settings)
    assert isinstance(store, FileStore) and store.root == (tmp_path / "data" / "storage").resolve()
    assert isinstance(open_store(url=f"file://{tmp_path / 'x'}"), FileStore)
    s3 = open_store(s3_settings)
    assert isinstance(s3, S3Store) and s3.url == s3_settings.storage_url
    with pytest.raises(ValueError):
        open_store(settings, url="ftp://host/dir")


def test_import_is_light():
    code = "import sys, hotswap.storage; assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
