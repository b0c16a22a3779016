"""Terminal output shared by every `hotswap` subcommand: one-line errors and a non-zero exit."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from hotswap.openai_schemas import printable

out = Console()
err = Console(stderr=True, soft_wrap=True)  # errors stay on one line, whatever the terminal width


def fail(message: str) -> None:
    """One readable line on stderr and exit code 1: how every CLI error ends. The message is plain
    text: it quotes files and servers, so "[/]" in it is not rich markup, and a lone surrogate (an
    undecodable file name) is written as an escape instead of crashing the write."""
    text = escape(printable(message))
    err.print(f"[bold red]error:[/] {text}", highlight=False)
    raise typer.Exit(code=1)
