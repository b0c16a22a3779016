"""A live API (uvicorn over real HTTP) on a real Redis and a real object store."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.servers import free_port


class LiveServer:
    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            try:
                if httpx.get(self.url + "/healthz").status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("API did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(params=["s3", "file"])
def api_settings(request, redis_url, demo_model_dir, tmp_path):
    """Settings for a live API: real Redis, and moto S3 over HTTP or file:// storage."""
    from hotswap.settings import Settings

    if request.param == "s3":
        base = request.getfixturevalue("s3_settings")
        return base.model_copy(update=dict(redis_url=redis_url, base_model_dir=demo_model_dir))
    return Settings(redis_url=redis_url, storage_url=f"file://{tmp_path / 'store'}", base_model_dir=demo_model_dir,
                    cache_dir=tmp_path / "cache", data_dir=tmp_path / "data")


@pytest.fixture
def live_api(api_settings, redis_client):
    from api.app import create_app

    with LiveServer(create_app(api_settings)) as server:
        yield server


@pytest.fixture
def api_key(redis_client):
    from api.auth import create_key

    return create_key(redis_client, "acme")


@pytest.fixture(scope="session")
def small_adapter(demo_model_dir, tmp_path_factory):
    from tests.factories import make_peft_adapter

    return make_peft_adapter(demo_model_dir, tmp_path_factory.mktemp("adapter") / "support-bot", seed=7,
                             r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
