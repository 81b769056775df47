"""Compacted-cache storage: the blob format (`blob`), the Redis store (`redis_store`) and how to reach Redis
(`redis_server`). Import from those modules directly; this package exports nothing of its own."""
