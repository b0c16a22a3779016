"""One live stack per test module: a Redis of its own (never flushed under the workers), moto S3
over HTTP, a `hotswap worker` and a `hotswap scheduler` subprocess, and the API over real HTTP."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def live_stack(tmp_path_factory, demo_model_dir, s3_endpoint):
    import boto3
    import redis

    from adapters.format import inspect_lora_adapter
    from adapters.registry import Registry
    from api.app import create_app
    from api.auth import create_key
    from hotswap.settings import Settings
    from hotswap.storage import open_store
    from tests.api.conftest import LiveServer
    from tests.factories import make_peft_adapter
    from tests.servers import redis_server
    from tests.stack import Stack, stack_env

    tmp = tmp_path_factory.mktemp("stack")
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    creds = dict(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    boto3.client("s3", endpoint_url=s3_endpoint, **creds).create_bucket(Bucket=bucket)
    storage_env = {"HOTSWAP_STORAGE_URL": f"s3://{bucket}/hotswap", "HOTSWAP_S3_ENDPOINT_URL": s3_endpoint,
                   "HOTSWAP_S3_ACCESS_KEY_ID": "testing", "HOTSWAP_S3_SECRET_ACCESS_KEY": "testing"}
    with redis_server() as url:
        settings = Settings(redis_url=url, storage_url=storage_env["HOTSWAP_STORAGE_URL"], s3_endpoint_url=s3_endpoint,
                            s3_access_key_id="testing", s3_secret_access_key="testing", base_model_dir=demo_model_dir,
                            cache_dir=tmp / "api-cache", data_dir=tmp / "api-data")
        client = redis.Redis.from_url(url)
        registry = Registry(client, open_store(settings))
        adapter_dir = make_peft_adapter(demo_model_dir, tmp / "support-bot", seed=11, r=8, lora_alpha=32,
                                        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
        base_config = json.loads((demo_model_dir / "config.json").read_text())
        record = registry.register("acme", "support-bot", "lora", settings.base_model, adapter_dir,
                                   inspect_lora_adapter(adapter_dir, base_config))
        env = stack_env(url, storage_env, demo_model_dir, tmp / "worker-cache")
        with Stack(env, tmp / "logs", workers=1) as stack, LiveServer(create_app(settings)) as api:
            yield SimpleNamespace(
                url=api.url, settings=settings, redis=client, stack=stack, registry=registry,
                key=create_key(client, "acme"), other_key=create_key(client, "globex"),
                adapter="support-bot", adapter_record=record, adapter_dir=adapter_dir,
            )
