"""Suggestions for an unknown task path of a dataset asset (shared by the BIG-bench and OpenAI-evals readers)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from cpt.assets.registry import DATASET_SOURCES, PINNED_PACKAGES
from cpt.errors import CptError


def similar_names(query: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` candidates close to ``query``, best first (difflib ratios).

    A query with a ``/`` is compared with whole paths; a single name with each folder of
    a path too (``plural`` finds ``linguistic_mappings/plural_json``).
    """
    query_lower = query.lower()
    scored = []
    for candidate in candidates:
        candidate_lower = candidate.lower()
        score = difflib.SequenceMatcher(None, query_lower, candidate_lower).ratio()
        if "/" not in query_lower:
            score = max(
                [
                    score,
                    *(difflib.SequenceMatcher(None, query_lower, part).ratio() for part in candidate_lower.split("/")),
                ]
            )
            if query_lower in candidate_lower:  # contained: ahead of mere look-alikes, the closest first
                score = 0.8 + 0.2 * score
        if score >= 0.6:
            scored.append((-score, candidate))
    return [candidate for _, candidate in sorted(scored)[:n]]


def unknown_path_error(source: str, path: str, known: list[str], what: str) -> CptError:
    """``unknown <what> '<path>' in <package file> (<n> available); close matches: …`` as one line."""
    close = similar_names(path, known)
    hint = ("; close matches: " + ", ".join(f"{source}:{match}" for match in close)) if close else ""
    return CptError(
        f"unknown {what} '{path}' in {PINNED_PACKAGES[DATASET_SOURCES[source][0]].filename}"
        f" ({len(known)} available){hint}"
    )
