"""Fault injection for the fault tests, kept out of the worker's own code: with
HOTSWAP_FAULT_CRASH_MARKER set, `worker.main` gives the service a hook that exits the process
abruptly (as a segfault or the OOM killer would) when it admits a prompt containing the marker."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger("hotswap.worker")


def crash_on_marker(marker: str, tokenizer) -> Callable[[object], None]:
    """A service admit hook: os._exit(71) on a request whose prompt decodes to text with `marker`."""

    def hook(req) -> None:
        if tokenizer is not None and marker in tokenizer.decode(req.prompt_token_ids):
            log.error("fault injection: prompt of %s carries the crash marker; exiting", req.id)
            os._exit(71)

    return hook
