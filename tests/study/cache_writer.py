"""A process that claims an expert-cache key and, on a miss, "trains" (sleeps) and stores an entry.

Run as ``python cache_writer.py CACHE_ROOT KEY LOG PAUSE``; the tests start two at once.
"""

import os
import sys
import time

from cpt.study.expert_cache import ExpertCache


def write_entry(cache_root: str, key: str, log_path: str, pause: float) -> None:
    cache = ExpertCache(cache_root)
    with cache.claim(key) as entry:
        if entry is None:
            with open(log_path, "a") as log:
                log.write(f"trained by {os.getpid()}\n")
            time.sleep(pause)  # the other process must wait on the lock, not train too

            def write(folder):
                (folder / "model.safetensors").write_bytes(os.urandom(4096))
                (folder / "config.json").write_text("{}")

            cache.store(key, write, kind="full", inputs={"k": key})


if __name__ == "__main__":
    write_entry(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
