"""The local asset cache: where it is (``$CPT_CACHE``), its format version, progress lines, and the per-asset lock.

Several ranks may prepare the same asset at once; :func:`cache_lock` makes one of them do
it while the others wait, then find it ready.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from cpt.io import read_json

# Bump when the layout or the columns of converted assets change: older cache folders
# are then rebuilt on their next use.
ASSET_FORMAT = 1


def asset_complete(folder: Path, marker: str, files: tuple[str, ...]) -> bool:
    """Whether ``folder`` holds a finished asset: its ``marker`` JSON records the current :data:`ASSET_FORMAT` and
    every one of ``files`` is there (an older or half-written folder is rebuilt)."""
    info = read_json(folder / marker) if folder.is_dir() else None
    return (
        isinstance(info, dict)
        and info.get("format") == ASSET_FORMAT
        and all((folder / name).is_file() for name in files)
    )


def cache_dir() -> Path:
    """The asset cache: ``$CPT_CACHE`` if set, else ``~/.cache/cpt``."""
    env = os.environ.get("CPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cpt"


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"cpt assets: {message}", file=sys.stderr, flush=True)


def _slug(text: str) -> str:
    """A file-name-safe, unique name for ``text`` (a readable prefix + a hash)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:80]
    return f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def cache_lock(key: str) -> Iterator[None]:
    """An exclusive inter-process lock (several ranks may prepare the same asset)."""
    path = cache_dir() / "locks" / f"{_slug(key)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no inter-process lock
        yield
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"waiting for another process preparing {key}…")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
