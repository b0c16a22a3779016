"""`hotswap worker`: one process per GPU = one engine + one Celery consumer of its own queue.

The engine is built before Celery starts, in this process (the solo pool never forks, so CUDA is
initialised exactly once, where it is used), on the thread that will run its steps. SIGTERM makes
Celery stop consuming; then the service drains: running requests finish or are requeued, nothing
is lost.
"""

from __future__ import annotations

import logging

log = logging.getLogger("hotswap.worker")


def build_engine(settings):
    from hotswap.demo_model import fetch_demo_model
    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine

    model_dir = settings.resolved_base_model_dir
    if settings.base_model_dir is None and not (model_dir / "config.json").exists():
        log.info("demo model not found: fetching it once")
        model_dir = fetch_demo_model(settings.model_root, log=log.info)
    return LLMEngine(EngineConfig(
        model=model_dir, device=settings.device, dtype=settings.dtype, max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=max(1024, settings.max_num_seqs), max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank, kv_cache_gb=settings.kv_cache_gb,
        enable_prefix_caching=settings.prefix_caching,
        cpu_tuning=settings.cpu_tuning, cpu_tuning_cache=settings.resolved_cpu_tuning_dir,
    ))


def make_service(settings, engine=None):
    import redis

    from adapters.cache import AdapterCache
    from adapters.registry import Registry
    from hotswap.storage import open_store
    from worker.service import WorkerService
    from worker.torch_thread import TorchThread

    torch_thread = TorchThread()  # loads the model and runs every step: one OpenMP team (see there)
    engine = engine or torch_thread.call(build_engine, settings)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, health_check_interval=30)
    store = open_store(settings)
    hook = None
    if settings.fault_crash_marker:  # fault tests only
        from worker.faults import crash_on_marker

        hook = crash_on_marker(settings.fault_crash_marker, engine.tokenizer)
    return WorkerService(engine, client, Registry(client, store), AdapterCache.from_settings(store, settings), settings,
                         torch_thread=torch_thread, admit_hook=hook)


def run_worker(settings, loglevel: str = "INFO") -> None:
    from scheduler.celery_app import make_celery
    from scheduler.tasks import register_worker_tasks

    service = make_service(settings)
    app = make_celery(settings.redis_url)
    register_worker_tasks(app, service.accept)
    service.start()
    consumer = app.Worker(
        queues=[service.info.queue], pool="solo", concurrency=1, prefetch_multiplier=1,
        hostname=f"{service.id}@hotswap", loglevel=loglevel, without_heartbeat=True, without_mingle=True,
        without_gossip=True, quiet=True,
    )
    try:
        consumer.start()
    finally:
        service.drain()
