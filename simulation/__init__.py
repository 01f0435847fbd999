"""Deterministic multi-instance simulation on virtual time (see ARCHITECTURE.md)."""
