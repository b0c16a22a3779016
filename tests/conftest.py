"""Shared fixtures: the real demo model (fetched once into the user cache) and its HF twin."""

from __future__ import annotations

import os

import pytest
import torch

# Triton decides once, when it is imported, whether it interprets or compiles; engine modules import
# it, so this must happen before any test module is collected. On CPU the kernels run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def demo_model_dir():
    from hotswap.demo_model import fetch_demo_model

    return fetch_demo_model(log=lambda m: None)


@pytest.fixture(scope="session")
def hf_demo_model(demo_model_dir):
    """transformers' own Llama on the same weights, in float32: the reference the engine must match."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir):
    from hotswap.tokenizer import Tokenizer

    return Tokenizer(demo_model_dir)


@pytest.fixture(scope="session")
def redis_url():
    """A real Redis server for the session (fresh keyspace per test via `redis_client`)."""
    from tests.servers import redis_server

    with redis_server() as url:
        yield url


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server over HTTP for the session."""
    from tests.servers import s3_server

    with s3_server() as url:
        yield url


@pytest.fixture
def s3_settings(s3_endpoint, tmp_path, monkeypatch):
    """Settings pointing at a fresh bucket on the moto server."""
    import uuid

    import boto3

    from hotswap.settings import Settings

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    creds = dict(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    boto3.client("s3", endpoint_url=s3_endpoint, **creds).create_bucket(Bucket=bucket)
    return Settings(storage_url=f"s3://{bucket}/hotswap", s3_endpoint_url=s3_endpoint,
                    s3_access_key_id="testing", s3_secret_access_key="testing",
                    cache_dir=tmp_path / "cache", data_dir=tmp_path / "data")
