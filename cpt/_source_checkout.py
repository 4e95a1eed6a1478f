"""``cpt.callbacks`` when cpt runs from a source checkout that is not installed.

The public callbacks live in the repository's top-level ``callbacks/`` folder. An installed
cpt maps that folder to ``cpt.callbacks`` itself (setup.py: a wheel copies it to
``cpt/callbacks/``; an editable install's finder points there). Run from a checkout without
installing it (``python cpt/run.py``, ``PYTHONPATH=.``), nothing would, so this finder maps
that one name. It goes first on ``sys.meta_path`` so that a checkout imports its own
callbacks even when another copy of cpt is installed in editable mode.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path


class CallbacksFolderFinder(importlib.abc.MetaPathFinder):
    """Finds ``cpt.callbacks`` in ``folder``; its submodules are then found through the package's ``__path__``."""

    name = "cpt.callbacks"

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


def install_callbacks_finder() -> None:
    """Map ``cpt.callbacks`` to ``<checkout>/callbacks`` when this cpt is a checkout's ``cpt/`` folder."""
    package = Path(__file__).resolve().parent
    folder = package.parent / "callbacks"
    if (package / "callbacks").is_dir() or not (folder / "__init__.py").is_file():
        return  # an installed wheel (cpt/callbacks/ is there), or no callbacks folder next to cpt/
    if any(type(finder).__name__ == CallbacksFolderFinder.__name__ for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, CallbacksFolderFinder(folder))
