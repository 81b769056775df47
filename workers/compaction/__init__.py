"""Attention Matching KV-cache compaction: pure tensor math plus thin model glue (no I/O here)."""
