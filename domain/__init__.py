"""The pure core of the gateway: protocol, sessions, subscriptions, typing, presence.

Nothing in this package performs I/O, reads a clock, or imports anything beyond the
standard library (enforced by import-linter, see pyproject.toml). Time is always an
argument; effects are returned as frozen dataclasses for the shell to carry out.
"""
