"""Entry point for ``accelerate launch cpt/run.py RECIPE [--set KEY=VALUE ...] [--overwrite]``.

The same as ``cpt run``; kept thin so that accelerate/DeepSpeed launchers can start it.
"""

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # Launched as a script: Python put cpt/ itself first on sys.path, where its modules would
    # shadow top-level names; put the repository root there instead.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from cpt.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
