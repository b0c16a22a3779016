"""The files of a user's dir: names hotswap knows, regular files only (never a link), bounded JSON.

Symlinks are never followed: a link in an upload could point anywhere on the machine (/etc/passwd),
so only regular files are read and anything else is refused (`NotRegularFileError`). All JSON goes
through `hotswap.safe_json` (deep nesting is an error, not a RecursionError). Messages name files by
their name inside the dir, never by a full path (on the server it is a temp dir the user never saw).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from adapters.errors import InvalidConfigError, MissingFileError, NotRegularFileError
from hotswap import safe_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_INDEX = "model.safetensors.index.json"

# Files an upload may carry; anything else (a pickled .bin above all) is refused by name, unopened.
# \Z, not $: $ also matches before a trailing newline ("README.md\n").
UPLOADABLE_FILE = re.compile(
    r"^(adapter_config\.json|adapter_model\.safetensors|config\.json|generation_config\.json|"
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|tokenizer\.json|"
    r"tokenizer_config\.json|special_tokens_map\.json|chat_template\.jinja|README\.md)\Z"
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_JSON_BYTES = 16 << 20
_LINK = "{} is a symbolic link; hotswap uploads regular files only (copy the file into the directory)"
_NOT_REGULAR = "{} is not a regular file; hotswap uploads regular files only"


def as_dir(path: str | Path, what: str) -> Path:
    root = Path(path)  # the directory itself may be a link (the user's choice); what is inside may not
    if not root.exists():
        raise MissingFileError(f"the {what} directory does not exist")
    if not root.is_dir():
        raise MissingFileError(f"not a directory: expected a {what} dir")
    return root


def why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__  # str(exc) would repeat the full path


def is_file(path: Path) -> bool:
    """True for a regular file, False if nothing is there; a symlink (or FIFO, device, dir) is refused.

    lstat, not Path.is_file(): is_file() follows links, and a link in a user's dir may point anywhere.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte or unencodable character in the name
        reason = why(exc) if isinstance(exc, OSError) else "not a valid file name"
        raise MissingFileError(f"cannot read {path.name!r}: {reason}") from None
    if stat.S_ISLNK(mode):
        raise NotRegularFileError(_LINK.format(path.name))
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(_NOT_REGULAR.format(path.name))
    return True


# O_NOFOLLOW: a link swapped in after the lstat above still fails (no check-then-open race);
# O_NONBLOCK: a FIFO swapped in cannot hang the open.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def open_regular_file(path: str | Path):
    """Open a file of a user's dir for binary reading, refusing anything but a regular file (never follows links)."""
    path = Path(path)
    if not is_file(path):
        raise MissingFileError(f"{path.name} does not exist")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFileError(_LINK.format(path.name)) from None
        raise MissingFileError(f"cannot read {path.name}: {why(exc)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(_NOT_REGULAR.format(path.name))
    return os.fdopen(fd, "rb")


def pickled_files(root: Path) -> list[str]:
    # Only named in a message, never opened or followed.
    return sorted(p.name for p in root.iterdir() if p.name.lower().endswith(_PICKLE_SUFFIXES))


def read_json(path: Path) -> Any:
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > _MAX_JSON_BYTES:
            raise InvalidConfigError(f"{path.name} is {size} bytes; a config file should be a few KB")
        data = f.read(_MAX_JSON_BYTES)
    try:
        return safe_json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidConfigError(f"{path.name} is not valid JSON: it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidConfigError(
            f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except safe_json.JSONDepthError as exc:
        raise InvalidConfigError(f"{path.name} cannot be used: {exc}") from None
    except ValueError:  # json.loads refuses integers of over 4300 digits
        raise InvalidConfigError(f"{path.name} is not usable JSON: it holds a number too long to read") from None


def read_json_object(path: Path) -> dict:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise InvalidConfigError(f"{path.name} must hold a JSON object, got {type(raw).__name__}")
    return raw
