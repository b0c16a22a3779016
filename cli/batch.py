"""`hotswap batch ...`: run a JSONL file of requests as a batch job (the OpenAI Batch API) and
fetch its results. Talks to the API only (HOTSWAP_API_URL / HOTSWAP_API_KEY, or --api-url /
--api-key), like `hotswap adapters`.

    hotswap batch submit requests.jsonl --wait        # upload, create, follow with a progress bar
    hotswap batch results batch_... -o out.jsonl --errors err.jsonl
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer

from hotswap import safe_json
from cli.client import Api, ApiKey, ApiUrl
from cli.console import err, fail, out

app = typer.Typer(help="Batch jobs: submit a JSONL file of requests, follow it, fetch the results.",
                  no_args_is_help=True)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
ENDED = ("completed", "failed", "expired", "cancelled")


def check_jsonl(path: Path) -> int:
    """Fail early, before anything is uploaded: the file must exist and hold JSON objects, one a line."""
    if not path.exists():
        fail(f"{path}: no such file")
    if not path.is_file():
        fail(f"{path} is not a file")
    count = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = safe_json.loads(line)
            except ValueError as exc:
                fail(f"{path} is not JSONL: line {number} is not valid JSON ({exc})")
            if not isinstance(obj, dict):
                fail(f"{path} is not JSONL: line {number} is not a JSON object")
            count += 1
    if count == 0:
        fail(f"{path} has no requests")
    return count


def _counts(batch: dict) -> str:
    c = batch.get("request_counts") or {}
    return f"{c.get('completed', 0)} completed, {c.get('failed', 0)} failed of {c.get('total', 0)}"


def _summary(batch: dict) -> str:
    return f"{batch['id']}  {batch['status']}  ({_counts(batch)})"


def _print_errors(batch: dict) -> None:
    for e in ((batch.get("errors") or {}).get("data") or [])[:20]:
        err.print(f"  {e.get('code')}: {e.get('message')}", highlight=False, markup=False)


def _follow(api, batch: dict, poll_s: float) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as progress:
        task = progress.add_task(batch["status"], total=None)
        while batch["status"] not in ENDED:
            time.sleep(poll_s)
            batch = api.call("GET", f"/v1/batches/{batch['id']}")
            c = batch.get("request_counts") or {}
            progress.update(task, description=batch["status"], total=c.get("total") or None,
                            completed=c.get("completed", 0) + c.get("failed", 0))
    return batch


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="JSONL: one {custom_id, method, url, body} request a line.")],
    endpoint: Annotated[str, typer.Option(help="/v1/chat/completions or /v1/completions (every line's url).")] = "/v1/chat/completions",
    wait: Annotated[bool, typer.Option("--wait", help="Follow the batch to its end; exit 1 unless it completes.")] = False,
    metadata: Annotated[Optional[list[str]], typer.Option("--metadata", "-m", help="KEY=VALUE (repeatable).")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between status checks with --wait.", min=0.1)] = 2.0,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Upload FILE and start a batch; prints the batch id (and with --wait, how it ended)."""
    if endpoint not in ENDPOINTS:
        fail(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
    pairs = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--metadata takes KEY=VALUE, got {item!r}")
        pairs[key] = value
    lines = check_jsonl(file)
    api = Api(api_url, api_key)
    with open(file, "rb") as f:
        uploaded = api.call("POST", "/v1/files", data={"purpose": "batch"},
                            files={"file": (file.name, f, "application/jsonl")})
    body = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
    if pairs:
        body["metadata"] = pairs
    batch = api.call("POST", "/v1/batches", json=body)
    err.print(f"uploaded {file.name} ({lines} requests) as {uploaded['id']}; batch created:", highlight=False)
    print(batch["id"])
    if not wait:
        return
    batch = _follow(api, batch, poll)
    err.print(_summary(batch), highlight=False, markup=False)
    if batch["status"] != "completed":
        _print_errors(batch)
        raise typer.Exit(code=1)
    err.print(f"fetch the results with: hotswap batch results {batch['id']} -o output.jsonl", highlight=False)


@app.command()
def status(
    batch_id: Annotated[str, typer.Argument(help="batch_...")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole Batch object.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """A batch's status and request counts."""
    batch = Api(api_url, api_key).call("GET", f"/v1/batches/{batch_id}")
    if as_json:
        out.print_json(json.dumps(batch))
        return
    out.print(_summary(batch), highlight=False, markup=False)
    for name in ("output_file_id", "error_file_id"):
        if batch.get(name):
            out.print(f"{name}: {batch[name]}", highlight=False)
    _print_errors(batch)


def _download(api, file_id: str, dest: Path) -> int:
    import httpx

    try:
        with api.client.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.status_code >= 400:
                response.read()
                try:
                    message = response.json()["error"]["message"]
                except Exception:
                    message = response.text[:300]
                fail(f"{message} (HTTP {response.status_code})")
            size = 0
            with open(dest, "wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
                    size += len(chunk)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the API at {api.base}: {exc}")
    return size


@app.command()
def results(
    batch_id: Annotated[str, typer.Argument(help="batch_...")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the successful lines (JSONL).")],
    errors: Annotated[Optional[Path], typer.Option("--errors", help="Where to write the failed lines (JSONL).")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download a finished batch's output (and error) file; lines carry custom_id to join on."""
    api = Api(api_url, api_key)
    batch = api.call("GET", f"/v1/batches/{batch_id}")
    if batch["status"] == "failed":
        _print_errors(batch)
        fail(f"batch {batch_id} failed validation: it has no results")
    if batch["status"] not in ENDED:
        fail(f"batch {batch_id} is {batch['status']}: results exist once it ends (see `hotswap batch status`)")
    counts = batch.get("request_counts") or {}
    if batch.get("output_file_id"):
        _download(api, batch["output_file_id"], output)
    else:
        output.write_bytes(b"")
    out.print(f"{output}: {counts.get('completed', 0)} successful lines", highlight=False)
    if batch.get("error_file_id"):
        if errors is None:
            err.print(f"{counts.get('failed', 0)} requests failed: pass --errors FILE to fetch them", highlight=False)
        else:
            _download(api, batch["error_file_id"], errors)
            out.print(f"{errors}: {counts.get('failed', 0)} failed lines", highlight=False)
    elif errors is not None:
        errors.write_bytes(b"")


@app.command()
def cancel(
    batch_id: Annotated[str, typer.Argument(help="batch_...")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Cancel a batch: finished requests keep their results, the rest never run."""
    batch = Api(api_url, api_key).call("POST", f"/v1/batches/{batch_id}/cancel")
    out.print(_summary(batch), highlight=False, markup=False)


@app.command("list")
def list_(
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many, newest first.")] = 20,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Your batches, newest first."""
    from rich.table import Column, Table

    rows = Api(api_url, api_key).call("GET", "/v1/batches", params={"limit": limit})["data"]
    if not rows:
        out.print("no batches yet: start one with `hotswap batch submit FILE.jsonl`")
        return
    table = Table(Column("id", no_wrap=True, min_width=30), "status", "endpoint", "completed", "failed", "total",
                  "created")
    for b in rows:
        c = b.get("request_counts") or {}
        created = datetime.fromtimestamp(b["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(b["id"], b["status"], b["endpoint"], str(c.get("completed", 0)), str(c.get("failed", 0)),
                      str(c.get("total", 0)), created)
    out.print(table)
