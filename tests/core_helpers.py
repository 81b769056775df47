"""Shared pieces of the compaction-core tests: tiny models (cached per process) and a test document."""

from __future__ import annotations

from functools import lru_cache

from workers.models.loading import LoadedModel, load_model

DOCUMENT = (
    "The lighthouse on Gull Point was built by Mara Quill in 1931. Its lamp burned whale oil until 1950, when an "
    "electric lamp replaced it. Keepers logged every ship that passed; the busiest year was 1944, with 812 ships. "
    "The last keeper, Tomas Reyne, left in 1979 and the light has been automatic since. " * 2
)


@lru_cache(maxsize=None)
def tiny(family: str) -> LoadedModel:
    return load_model(f"tiny-{family}")
