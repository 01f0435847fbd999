"""Baseline servers the gateway is measured against (same Hypercorn serving)."""
