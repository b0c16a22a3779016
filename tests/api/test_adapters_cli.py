"""Issue 'registry': upload -> list -> show -> resolve -> new version -> delete, through the real CLI
against a live API (real Redis; moto S3 over HTTP and file:// storage)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest

HOTSWAP = os.path.join(os.path.dirname(sys.executable), "hotswap")


def cli(live_api, key, *args):
    env = {**os.environ, "HOTSWAP_API_URL": live_api.url, "HOTSWAP_API_KEY": key}
    return subprocess.run([HOTSWAP, "adapters", *args], capture_output=True, text=True, env=env, timeout=300)


def test_upload_list_show_version_delete(live_api, api_key, small_adapter, api_settings, redis_client):
    from adapters.registry import Registry
    from hotswap.storage import open_store

    up = cli(live_api, api_key, "upload", str(small_adapter), "--name", "support-bot")
    assert up.returncode == 0, up.stderr
    assert "support-bot@1" in up.stdout

    listed = cli(live_api, api_key, "list")
    assert listed.returncode == 0 and "support-bot" in listed.stdout

    shown = cli(live_api, api_key, "show", "support-bot")
    assert shown.returncode == 0
    body = json.loads(shown.stdout)
    assert body["id"] == "support-bot@1" and body["rank"] == 8 and body["kind"] == "lora"
    assert sorted(body["target_modules"]) == ["q_proj", "v_proj"]

    assert cli(live_api, api_key, "upload", str(small_adapter), "--name", "support-bot").returncode == 0
    registry = Registry(redis_client, open_store(api_settings))
    assert registry.resolve("acme", "support-bot").version == 2
    assert registry.resolve("acme", "support-bot@1").version == 1
    # The blobs are really in the store, checksummed.
    record = registry.resolve("acme", "support-bot@2")
    assert open_store(api_settings).info(record.files["adapter_model.safetensors"].key).sha256 == record.sha256

    deleted = cli(live_api, api_key, "delete", "support-bot@2")
    assert deleted.returncode == 0, deleted.stderr
    assert registry.resolve("acme", "support-bot").version == 1
    assert cli(live_api, api_key, "delete", "support-bot").returncode == 0
    gone = cli(live_api, api_key, "show", "support-bot")
    assert gone.returncode == 1 and "support-bot" in gone.stderr and "HTTP 404" in gone.stderr


def test_tenants_never_see_each_other(live_api, api_key, small_adapter, redis_client):
    from api.auth import create_key

    other = create_key(redis_client, "globex")
    assert cli(live_api, api_key, "upload", str(small_adapter), "--name", "private").returncode == 0
    assert "private" not in cli(live_api, other, "list").stdout
    assert cli(live_api, other, "show", "private").returncode == 1
    assert cli(live_api, other, "delete", "private").returncode == 1
    assert "private" in cli(live_api, api_key, "list").stdout  # still there for its owner


def test_missing_or_wrong_key_is_401_with_the_error_envelope(live_api):
    for headers in ({}, {"Authorization": "Bearer hs-wrong"}):
        r = httpx.get(live_api.url + "/v1/adapters", headers=headers)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_health_and_readiness(live_api):
    assert httpx.get(live_api.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(live_api.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}


def broken(small_adapter, tmp_path, how: str):
    """A copy of a good adapter with one thing wrong."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / how
    shutil.copytree(small_adapter, d)
    weights = d / "adapter_model.safetensors"
    config = d / "adapter_config.json"
    if how == "pickled-bin":
        weights.unlink()
        (d / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    elif how == "no-config":
        config.unlink()
    elif how == "rank-too-large":
        cfg = json.loads(config.read_text())
        tensors = {k: v.repeat(16, 1) if "lora_A" in k else v.repeat(1, 16) for k, v in load_file(weights).items()}
        cfg["r"] = 128
        config.write_text(json.dumps(cfg))
        save_file(tensors, weights)
    elif how == "corrupted":
        data = bytearray(weights.read_bytes())
        weights.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "wrong-base":
        tensors = {k: (v[:, :64] if "lora_A" in k else v[:64]).contiguous() for k, v in load_file(weights).items()}
        save_file(tensors, weights)
    return d


BROKEN = {
    "pickled-bin": "safetensors",
    "no-config": "adapter_config.json",
    "rank-too-large": "rank",
    "corrupted": "adapter_model.safetensors",
    "wrong-base": "hidden_size",
}


@pytest.mark.parametrize("how", list(BROKEN))
def test_bad_uploads_are_refused_and_leave_nothing(how, live_api, api_key, small_adapter, tmp_path, api_settings,
                                                   redis_client):
    from hotswap.storage import open_store

    path = broken(small_adapter, tmp_path, how)
    # Through the CLI: refused before anything is sent (local validation), one readable line.
    r = cli(live_api, api_key, "upload", str(path), "--name", "bad")
    assert r.returncode == 1 and BROKEN[how] in r.stderr and "Traceback" not in r.stderr
    # Straight to the API (a client that skips local checks): a 400 naming the problem.
    files = [("files", (p.name, p.read_bytes())) for p in sorted(path.iterdir())]
    resp = httpx.post(live_api.url + "/v1/adapters", data={"name": "bad"}, files=files,
                      headers={"Authorization": f"Bearer {api_key}"}, timeout=60)
    assert resp.status_code == 400, resp.text
    assert BROKEN[how] in resp.json()["error"]["message"]
    # Nothing recorded, nothing stored.
    assert not [k for k in redis_client.keys("hotswap:reg:*") if b":model:" in k]
    assert open_store(api_settings).list("tenants/") == []


@pytest.mark.parametrize("name", ["../escape", "UPPER", "a/b", "x" * 80, "a..b"])
def test_bad_names_are_refused(name, live_api, api_key, small_adapter):
    r = cli(live_api, api_key, "upload", str(small_adapter), "--name", name)
    assert r.returncode == 1 and "name" in r.stderr
    files = [("files", (p.name, p.read_bytes())) for p in sorted(small_adapter.iterdir())]
    resp = httpx.post(live_api.url + "/v1/adapters", data={"name": name}, files=files,
                      headers={"Authorization": f"Bearer {api_key}"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "name"


def test_an_upload_over_the_size_limit_is_refused_and_leaves_nothing(api_settings, redis_client, api_key,
                                                                     small_adapter):
    from api.app import create_app
    from hotswap.storage import open_store
    from tests.api.conftest import LiveServer

    small = api_settings.model_copy(update={"max_upload_mb": 1})  # the adapter is ~1 MB of weights
    with LiveServer(create_app(small)) as server:
        r = cli(server, api_key, "upload", str(small_adapter), "--name", "too-big")
    assert r.returncode == 1 and "exceeds this server's limit" in r.stderr and "HTTP 413" in r.stderr
    assert not [k for k in redis_client.keys("hotswap:reg:*") if b":model:" in k]
    assert open_store(api_settings).list("tenants/") == []
