"""What every benchmark writes beside its figures in ``benchmarks/RESULTS.md``: the machine, and its own section."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """The accelerator if there is one, else the CPU, in words."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"1× {torch.cuda.get_device_name(0)}"
    except ImportError:  # pragma: no cover
        pass
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"


def replace_section(heading: str, body: str) -> None:
    """Put ``## heading`` + ``body`` into RESULTS.md, replacing that section if it is there."""
    heading = f"## {heading}"
    section = f"{heading}\n\n{body.strip()}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text.rstrip() + "\n")
