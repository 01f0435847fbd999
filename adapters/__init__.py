"""Adapters: one module per outside thing, each implementing ports of ``domain.ports``."""
