"""The Files API over real HTTP (uvicorn, real Redis, moto S3 or file:// storage): the official
`openai` client for the happy path, plain httpx for the errors and the presigned-URL extension."""

from __future__ import annotations

import httpx
import openai
import pytest

LINES = (b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", '
         b'"messages": [{"role": "user", "content": "hi"}]}}\n'
         b'{"custom_id": "r2", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "x"}}\n')


def client(live_api, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_api.url + "/v1", api_key=key, max_retries=0)


def auth(key) -> dict:
    return {"Authorization": f"Bearer {key}"}


def upload(live_api, key, data: bytes = LINES, purpose: str | None = "batch", name: str = "in.jsonl"):
    form = {} if purpose is None else {"purpose": purpose}
    return httpx.post(live_api.url + "/v1/files", headers=auth(key), data=form, files={"file": (name, data)})


def error_of(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


def test_create_list_retrieve_content_delete(live_api, api_key, tmp_path):
    oa = client(live_api, api_key)
    path = tmp_path / "requests.jsonl"
    path.write_bytes(LINES)
    with open(path, "rb") as f:
        created = oa.files.create(file=f, purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose, created.status) == (len(LINES), "requests.jsonl",
                                                                                  "batch", "processed")
    second = oa.files.create(file=("more.jsonl", LINES), purpose="batch")

    assert oa.files.retrieve(created.id) == created
    page = oa.files.list()
    assert [f.id for f in page.data] == [second.id, created.id]  # newest first
    assert [f.id for f in oa.files.list(purpose="batch_output").data] == []

    content = oa.files.content(created.id)
    assert content.content == LINES

    deleted = oa.files.delete(created.id)
    assert deleted.id == created.id and deleted.deleted is True and deleted.object == "file"
    with pytest.raises(openai.NotFoundError):
        oa.files.retrieve(created.id)
    assert [f.id for f in oa.files.list().data] == [second.id]


def test_list_pagination(live_api, api_key):
    oa = client(live_api, api_key)
    ids = [oa.files.create(file=(f"f{i}.jsonl", LINES), purpose="batch").id for i in range(5)]
    first = oa.files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
    walked = [f.id for f in oa.files.list(limit=2)]  # the client follows has_more / after itself
    assert walked == ids[::-1]

    body = httpx.get(live_api.url + "/v1/files", headers=auth(api_key), params={"limit": 2, "after": ids[2]}).json()
    assert body["object"] == "list" and [f["id"] for f in body["data"]] == [ids[1], ids[0]]
    assert (body["has_more"], body["first_id"], body["last_id"]) == (False, ids[1], ids[0])
    empty = httpx.get(live_api.url + "/v1/files", headers=auth(api_key), params={"after": ids[0]}).json()
    assert empty == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}


def test_content_headers(live_api, api_key):
    file_id = upload(live_api, api_key, name="my batch.jsonl").json()["id"]
    resp = httpx.get(f"{live_api.url}/v1/files/{file_id}/content", headers=auth(api_key))
    assert resp.status_code == 200 and resp.content == LINES
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.headers["content-length"] == str(len(LINES))
    assert "my%20batch.jsonl" in resp.headers["content-disposition"]


@pytest.mark.parametrize("purpose", ["fine-tune", "batch_output", "assistants", ""])
def test_only_batch_purpose(live_api, api_key, purpose):
    err = error_of(upload(live_api, api_key, purpose=purpose), 400)
    assert err["param"] == "purpose" and "purpose" in err["message"]


@pytest.mark.parametrize("data, fragment", [
    (b"", "empty"),
    (b"\n\n  \n", "blank"),
    (b'{"a": 1}\nnot json\n', "line 2"),
    (b'[1, 2]\n', "line 1 is not a JSON object"),
    (b'{"a": "\xff"}\n', "UTF-8"),
])
def test_bad_files(live_api, api_key, data, fragment):
    err = error_of(upload(live_api, api_key, data=data), 400)
    assert err["param"] == "file" and fragment in err["message"]


def test_missing_parts(live_api, api_key):
    resp = httpx.post(live_api.url + "/v1/files", headers=auth(api_key), data={"purpose": "batch"})
    err = error_of(resp, 400)
    assert err["param"] == "file"
    err = error_of(upload(live_api, api_key, purpose=None), 400)
    assert err["param"] == "purpose"


def test_size_limit(live_api, api_key, api_settings):
    api_settings.max_batch_file_mb = 1  # the live app's own settings object
    big = b'{"pad": "' + b"x" * (1 << 20) + b'"}\n'
    err = error_of(upload(live_api, api_key, data=big), 413)
    assert err["param"] == "file" and "HOTSWAP_MAX_BATCH_FILE_MB" in err["message"]
    assert httpx.get(live_api.url + "/v1/files", headers=auth(api_key)).json()["data"] == []


def test_needs_a_key(live_api):
    assert httpx.get(live_api.url + "/v1/files").status_code == 401
    assert httpx.get(live_api.url + "/v1/files", headers=auth("hs-wrong")).status_code == 401


def test_tenant_isolation(live_api, api_key, redis_client):
    from api.auth import create_key

    other = create_key(redis_client, "globex")
    file_id = upload(live_api, api_key).json()["id"]
    base = f"{live_api.url}/v1/files/{file_id}"
    for method, url in [("GET", base), ("GET", base + "/content"), ("GET", base + "/url"), ("DELETE", base)]:
        err = error_of(httpx.request(method, url, headers=auth(other)), 404)
        assert file_id in err["message"]
    assert client(live_api, other).files.list().data == []
    # Still there, intact, for its owner.
    assert client(live_api, api_key).files.content(file_id).content == LINES
    with pytest.raises(openai.NotFoundError):
        client(live_api, other).files.delete(file_id)


@pytest.mark.parametrize("path", ["file-nope", "file-000000000000000000000000"])
def test_unknown_ids_404(live_api, api_key, path):
    for suffix in ("", "/content", "/url"):
        error_of(httpx.get(f"{live_api.url}/v1/files/{path}{suffix}", headers=auth(api_key)), 404)
    error_of(httpx.delete(f"{live_api.url}/v1/files/{path}", headers=auth(api_key)), 404)


def test_presigned_url(live_api, api_key, api_settings, redis_client):
    file_id = upload(live_api, api_key).json()["id"]
    resp = httpx.get(f"{live_api.url}/v1/files/{file_id}/url", headers=auth(api_key), params={"expires_in": 300})
    if api_settings.resolved_storage_url.startswith("file://"):
        err = error_of(resp, 400)
        assert "presigned URLs need S3 storage" in err["message"]
        return
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["expires_at"] > 0
    assert httpx.get(body["url"]).content == LINES  # no API key: the URL itself authorizes

    # Any S3 client can fetch the same object directly.
    import boto3

    from scheduler.batchjobs.files import FileCatalog
    from hotswap.storage import open_store

    store = open_store(api_settings)
    record = FileCatalog(redis_client, store).get("acme", file_id)
    s3 = boto3.client("s3", endpoint_url=api_settings.s3_endpoint_url, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    key = f"{store.prefix}/{record.storage_key}"
    assert s3.get_object(Bucket=store.bucket, Key=key)["Body"].read() == LINES

    err = error_of(httpx.get(f"{live_api.url}/v1/files/{file_id}/url", headers=auth(api_key),
                             params={"expires_in": 10}), 400)
    assert err["param"] == "expires_in"
