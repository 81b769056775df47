"""Pydantic models of the wire API and of the stored blob."""
