"""Terminal output shared by every `hotswap` subcommand: one-line errors and a non-zero exit."""

from __future__ import annotations

import typer
from rich.console import Console

out = Console()
err = Console(stderr=True, soft_wrap=True)  # errors stay on one line, whatever the terminal width


def fail(message: str) -> None:
    """One readable line on stderr and exit code 1: how every CLI error ends."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=1)
