"""`kvcompact` sub-commands that drive the compaction core directly (no service)."""
