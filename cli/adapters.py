"""`hotswap adapters ...`: upload, list, show and delete adapters through the API.

Users never need Redis or S3 credentials: only the API URL and their API key
(HOTSWAP_API_URL / HOTSWAP_API_KEY, or --api-url / --api-key).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, BinaryIO, Optional

import typer
from rich.table import Table

from cli.client import Api, ApiKey, ApiUrl
from cli.console import err, fail, out

app = typer.Typer(help="Upload and manage your LoRA adapters and full fine-tunes.", no_args_is_help=True)

class _ProgressReader:
    """A file wrapper that advances a progress bar as httpx streams it."""

    def __init__(self, f, progress, task):
        self._f, self._progress, self._task = f, progress, task

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._progress.advance(self._task, len(data))
        return data

    def close(self) -> None:
        self._f.close()


def _open_files(path: Path) -> list[tuple[str, BinaryIO]]:
    """(name, open file) for every uploadable file of the dir. Only regular files: a symlink (README.md ->
    /etc/passwd) is refused, never followed, so nothing from outside the dir is ever sent."""
    from adapters.format import UPLOADABLE_FILE, open_regular_file

    opened = []
    try:
        for p in sorted(path.iterdir()):
            if UPLOADABLE_FILE.match(p.name):
                opened.append((p.name, open_regular_file(p)))
    except BaseException:
        for _, f in opened:
            f.close()
        raise
    return opened


def _max_rank(server: dict) -> int | None:
    """The max LoRA rank GET /v1/hotswap/base-model reports; None when the server does not say (older servers)."""
    rank = server.get("max_lora_rank")
    return rank if isinstance(rank, int) and not isinstance(rank, bool) and rank > 0 else None


@app.command()
def upload(
    path: Annotated[Path, typer.Argument(help="An adapter dir (adapter_config.json + adapter_model.safetensors) or a full checkpoint dir.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Name to call it by, e.g. support-bot.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model it was trained on (default: the server's).")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Validate locally, upload with a progress bar, and print the name@version to call."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from adapters.errors import AdapterFormatError
    from adapters.format import inspect
    from adapters.names import validate_name

    try:
        validate_name(name)
    except ValueError as exc:
        fail(str(exc))
    if not path.is_dir():
        fail(f"{path} is not a directory")
    api = Api(api_url, api_key)
    server = api.call("GET", "/v1/hotswap/base-model")
    if base and base != server["name"]:
        fail(f"this server serves base model {server['name']!r}, not {base!r}")
    try:  # fast feedback: a broken adapter is never uploaded
        # The server's own rank ceiling; None (a server that does not report it) skips that one check here and
        # leaves it to the server. NaN/Inf in a full checkpoint's weights: the server scans them, not the laptop.
        kind = inspect(path, server["config"], _max_rank(server), check_finite=False).kind
        files = _open_files(path)
    except AdapterFormatError as exc:  # format messages name files inside the dir: say which dir
        fail(f"{path}: {exc}")
    except (OSError, ValueError) as exc:  # unreadable dir; or the server's base config is unusable
        fail(f"{path}: cannot validate: {exc}")
    total = sum(os.fstat(f.fileno()).st_size for _, f in files)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=err) as progress:
        task = progress.add_task(f"uploading {name}", total=total)
        readers = [(n, _ProgressReader(f, progress, task)) for n, f in files]
        try:
            record = api.call("POST", "/v1/adapters", data={"name": name, "base_model": server["name"]},
                              files=[("files", (n, r, "application/octet-stream")) for n, r in readers])
        except OSError as exc:  # a file vanished or failed to read while it was being sent
            fail(f"{path}: reading the files failed during the upload: {exc}")
        finally:
            for _, r in readers:
                r.close()
    out.print(f"uploaded {kind} [bold]{record['id']}[/] ({record['size_bytes']:,} bytes)", highlight=False)
    out.print(f"call it with model={record['name']!r} (latest) or model={record['id']!r}", highlight=False)


@app.command("list")
def list_(api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Your adapters and fine-tunes (latest version of each)."""
    rows = Api(api_url, api_key).call("GET", "/v1/adapters")["data"]
    table = Table("name", "version", "kind", "rank", "targets", "size")
    for r in rows:
        table.add_row(r["name"], str(r["version"]), r["kind"], str(r["rank"] or "-"),
                      ",".join(r["target_modules"] or []) or "-", f"{r['size_bytes']:,}")
    out.print(table if rows else "no adapters yet: upload one with `hotswap adapters upload PATH --name NAME`")


@app.command()
def show(ref: Annotated[str, typer.Argument(help="name or name@version")], api_url: ApiUrl = None,
         api_key: ApiKey = None) -> None:
    """One adapter's details and its versions."""
    import json

    out.print_json(json.dumps(Api(api_url, api_key).call("GET", f"/v1/adapters/{ref}")))


@app.command()
def delete(ref: Annotated[str, typer.Argument(help="name (all versions) or name@version")], api_url: ApiUrl = None,
           api_key: ApiKey = None) -> None:
    """Delete an adapter: new requests can no longer use it; queued ones still finish."""
    body = Api(api_url, api_key).call("DELETE", f"/v1/adapters/{ref}")
    out.print(f"deleted {ref} (versions {', '.join(map(str, body['versions']))})")
