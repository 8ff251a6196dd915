"""One helper for the caches of jitted functions that are kept for the latest model only."""

from __future__ import annotations


def cached_for(cache: dict, key, name: str, build):
    """build() (a jitted fn) kept in `cache` under `name` while calls pass the same `key`;
    another key empties the cache first, so only the latest model's compiled functions
    stay alive.  The key must hold everything the built functions close over."""
    if cache.get("key") != key:
        cache.clear()
        cache["key"] = key
    if name not in cache:
        cache[name] = build()
    return cache[name]
