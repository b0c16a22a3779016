"""What validation hands to feeding: the requests that will run, kept in object storage, and the
served model that lines are judged against.

The validated requests of a job are stored as objects of PREPARED_CHUNK lines each (one
`GenerationRequest` JSON a line) under `tenants/{tenant}/batches/{batch}/prepared/`, so a 50k-line
job never sits in Redis; the feeder reads one chunk at a time from its cursor, and a restarted
runner needs nothing but the cursor in the job record.
"""

from __future__ import annotations

from hotswap.base_model import ServedBase, context_limit
from hotswap.protocol import GenerationRequest
from scheduler.batchjobs.records import PREPARED_CHUNK, JobRecord, prepared_key
from scheduler.prepare import ServedModel


class ChunkWriter:
    """Stores validated requests as prepared objects of PREPARED_CHUNK lines each."""

    def __init__(self, store, tenant: str, batch_id: str):
        self.store, self.tenant, self.batch_id = store, tenant, batch_id
        self.lines: list[str] = []
        self.chunk = 0

    def add(self, req: GenerationRequest) -> None:
        self.lines.append(req.model_dump_json())
        if len(self.lines) == PREPARED_CHUNK:
            self._flush()

    def _flush(self) -> None:
        data = ("\n".join(self.lines) + "\n").encode()
        self.store.put_bytes(prepared_key(self.tenant, self.batch_id, self.chunk), data)
        self.lines, self.chunk = [], self.chunk + 1

    def close(self) -> None:
        if self.lines:
            self._flush()


class PreparedReader:
    """Reads a job's prepared requests from any position, keeping the current chunk of each job."""

    def __init__(self, store):
        self.store = store
        self._chunks: dict[str, tuple[int, list[str]]] = {}  # batch id -> (chunk index, its lines)

    def _lines(self, record: JobRecord, chunk: int) -> list[str]:
        cached = self._chunks.get(record.id)
        if cached is None or cached[0] != chunk:
            data = self.store.get_bytes(prepared_key(record.tenant, record.id, chunk))
            cached = (chunk, data.decode().splitlines())
            self._chunks[record.id] = cached
        return cached[1]

    def read(self, record: JobRecord, start: int, n: int) -> list[GenerationRequest]:
        """Up to `n` requests from position `start` (never past record.prepared)."""
        out: list[GenerationRequest] = []
        pos, end = start, min(start + n, record.prepared)
        while pos < end:
            offset = pos % PREPARED_CHUNK
            take = self._lines(record, pos // PREPARED_CHUNK)[offset:offset + (end - pos)]
            out += [GenerationRequest.model_validate_json(line) for line in take]
            pos += len(take)
        return out

    def forget(self, batch_id: str | None = None) -> None:
        if batch_id is None:
            self._chunks.clear()
        else:
            self._chunks.pop(batch_id, None)


def served_model(redis_client, base: ServedBase) -> ServedModel:
    """What a line is judged against, as the live API judges it: the context length every live
    worker accepts (the model's own when none runs yet: a batch may be submitted before workers)."""
    from scheduler.workers import live_workers

    limits = [w.max_model_len for w in live_workers(redis_client, base.name)]
    return ServedModel(base.name, base.tokenizer, context_limit(limits, base.config_len))
