"""FastAPI front end of the KV-cache compaction service."""
