"""The Celery app: Redis as broker, explicit queues only, late acks, one message in hand at a time.

Celery carries the dispatch messages; the truth about each request (who owns it, whether it is
done) is in Redis (`scheduler/queues.py`), so a redelivered or late message is harmless.
"""

from __future__ import annotations

from celery import Celery


def make_celery(redis_url: str) -> Celery:
    app = Celery("hotswap", broker=redis_url)
    app.conf.update(
        task_acks_late=True,  # a message is acked only after its task ran
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="hotswap.default",  # nothing should land here: every send names its queue
        task_create_missing_queues=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results travel through Redis streams, not Celery's backend
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app
