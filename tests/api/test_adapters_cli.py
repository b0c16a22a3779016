"""Issue 'registry': upload -> list -> show -> resolve -> new version -> delete, through the real CLI
against a live API (real Redis; moto S3 over HTTP and file:// storage)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

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
    assert "hotswap-upload-" not in resp.json()["error"]["message"]  # files as sent, not the server's temp dir
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


@pytest.mark.parametrize("api_settings", ["file"], indirect=True)
def test_the_cli_checks_ranks_against_the_servers_max_lora_rank(api_settings, redis_client, api_key, small_adapter,
                                                                 tmp_path):
    """The CLI's local check uses the rank ceiling the server reports, never a default of its own."""
    from api.app import create_app
    from tests.api.conftest import LiveServer

    with LiveServer(create_app(api_settings.model_copy(update={"max_lora_rank": 4}))) as server:
        reported = httpx.get(server.url + "/v1/hotswap/base-model", headers={"Authorization": f"Bearer {api_key}"})
        assert reported.json()["max_lora_rank"] == 4
        r = cli(server, api_key, "upload", str(small_adapter), "--name", "over-four")  # r = 8
    # Refused locally (the user's path in front, no HTTP status): nothing was sent.
    assert r.returncode == 1 and "maximum rank 4" in r.stderr and "HTTP" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"error: {small_adapter}: adapter_config.json has LoRA rank r = 8"), r.stderr
    assert not [k for k in redis_client.keys("hotswap:reg:*") if b":model:" in k]

    rank_128 = broken(small_adapter, tmp_path, "rank-too-large")  # above the default of 64
    with LiveServer(create_app(api_settings.model_copy(update={"max_lora_rank": 128}))) as server:
        r = cli(server, api_key, "upload", str(rank_128), "--name", "wide")
    assert r.returncode == 0, r.stderr
    assert "wide@1" in r.stdout


# --------------------------------------------------------------------------------------------------
# Hostile uploads (issue 14): every one is a 4xx with the error envelope, never a 500; refusals name files
# as the client sent them, never the server's temp dir.

NESTED = b"[" * 50_000 + b"]" * 50_000  # json.loads: RecursionError


def post_multipart(url: str, key: str, parts: list[tuple[bytes, bytes | None, bytes]], charset: str | None = None):
    """POST a hand-built multipart body (what httpx would refuse to send): parts are (field, filename, content).
    `charset` is the one Starlette decodes names with; "unicode_escape" lets a client send any code point."""
    boundary = b"hostile-boundary-7f3a"
    body = b""
    for field, filename, content in parts:
        disposition = b'form-data; name="' + field + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        body += b"--" + boundary + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + content + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    content_type = f"multipart/form-data; boundary={boundary.decode()}" + (f"; charset={charset}" if charset else "")
    return httpx.post(url + "/v1/adapters", content=body, timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})


def _adapter_parts(adapter, **replace: bytes) -> list[tuple[bytes, bytes, bytes]]:
    files = {p.name: p.read_bytes() for p in sorted(adapter.iterdir())}
    files.update(replace)
    return [(b"files", name.encode(), data) for name, data in files.items()]


HOSTILE = {  # id -> (parts(adapter), charset, status, fragment of the message)
    "nested-safetensors-header": (
        lambda a: [(b"name", None, b"bot")] + _adapter_parts(a, **{
            "adapter_model.safetensors": struct.pack("<Q", len(NESTED)) + NESTED}),
        None, 400, "adapter_model.safetensors has a corrupt safetensors header: JSON nested more than 64"),
    "nested-adapter-config": (
        lambda a: [(b"name", None, b"bot")] + _adapter_parts(a, **{"adapter_config.json": NESTED}),
        None, 400, "adapter_config.json cannot be used: JSON nested more than 64"),
    "invalid-json-named-as-sent": (
        lambda a: [(b"name", None, b"bot")] + _adapter_parts(a, **{"adapter_config.json": b'{"r": 8,'}),
        None, 400, "adapter_config.json is not valid JSON"),
    "no-files": (lambda a: [(b"name", None, b"bot")], None, 400, "files"),
    "part-without-filename": (lambda a: [(b"name", None, b"bot"), (b"files", None, b"{}")], None, 400, "files"),
    "empty-filename": (lambda a: [(b"name", None, b"bot"), (b"files", b"", b"{}")], None, 400, "not accepted"),
    "nul-in-filename": (lambda a: [(b"name", None, b"bot"), (b"files", b"adapter_config.json\x00", b"{}")],
                        None, 400, "not accepted"),
    "newline-after-filename": (lambda a: [(b"name", None, b"bot"), (b"files", b"README.md\\n", b"hi")]
                               + _adapter_parts(a), "unicode_escape", 400, "not accepted"),
    "lone-surrogate-filename": (lambda a: [(b"name", None, b"bot"), (b"files", b"adapter_config.json\\ud800", b"{}")]
                                + _adapter_parts(a), "unicode_escape", 400, "not accepted"),
    "filename-over-255-bytes": (lambda a: [(b"name", None, b"bot"), (b"files", b"a" * 300 + b".safetensors", b"")]
                                + _adapter_parts(a), None, 400, "not accepted"),
    "path-as-filename": (lambda a: [(b"name", None, b"bot"), (b"files", b"../adapter_config.json", b"{}")],
                         None, 400, "not accepted"),
    "lone-surrogate-name": (lambda a: [(b"name", None, b"bot\\ud800")] + _adapter_parts(a), "unicode_escape", 400,
                            "invalid model name"),
    "fullwidth-name": (lambda a: [(b"name", None, "ｂｏｔ".encode())] + _adapter_parts(a), None, 400,
                       "invalid model name"),
    "rtl-override-name": (lambda a: [(b"name", None, "bot\u202e".encode())] + _adapter_parts(a), None, 400,
                          "invalid model name"),
}


@pytest.mark.parametrize("api_settings", ["file"], indirect=True)  # refused before storage: one backend is enough
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_uploads_are_4xx_envelopes(case, live_api, api_key, small_adapter, redis_client):
    parts, charset, status, fragment = HOSTILE[case]
    r = post_multipart(live_api.url, api_key, parts(small_adapter), charset)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    assert "hotswap-upload-" not in error["message"]  # never the server's temp dir
    assert not [k for k in redis_client.keys("hotswap:reg:*") if b":model:" in k]


@pytest.mark.parametrize("api_settings", ["file"], indirect=True)
def test_cli_refuses_symlinks_and_sends_nothing_from_outside(live_api, api_key, small_adapter, tmp_path,
                                                             redis_client):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:TOP SECRET\n")
    for name, target in (("README.md", secret), ("adapter_model.safetensors", tmp_path / "weights-elsewhere")):
        d = Path(shutil.copytree(small_adapter, tmp_path / f"with-link-{name}"))
        if name == "adapter_model.safetensors":
            shutil.move(d / name, target)
        (d / name).unlink(missing_ok=True)  # PEFT writes a README.md
        (d / name).symlink_to(target)
        r = cli(live_api, api_key, "upload", str(d), "--name", "linked")
        assert r.returncode == 1, r.stdout
        assert f"{name} is a symbolic link; hotswap uploads regular files only" in r.stderr
        assert "Traceback" not in r.stderr
    assert not [k for k in redis_client.keys("hotswap:reg:*") if b":model:" in k]


@pytest.mark.parametrize("api_settings", ["file"], indirect=True)
@pytest.mark.parametrize("how", ["nested-config", "nested-header", "markup-in-message"])
def test_cli_prints_one_line_for_hostile_adapters(how, live_api, api_key, small_adapter, tmp_path):
    d = Path(shutil.copytree(small_adapter, tmp_path / how))
    if how == "nested-config":
        (d / "adapter_config.json").write_bytes(NESTED)
    elif how == "nested-header":
        (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(NESTED)) + NESTED)
    else:  # rich would read "[/]" in the message as a closing tag and crash
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": "[/]"}))
    r = cli(live_api, api_key, "upload", str(d), "--name", "hostile")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert f"{d}: adapter_" in r.stderr  # the user's own path, then the file at fault
