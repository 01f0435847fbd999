"""Benchmarks of the gateway against a bare broadcast ceiling and python-socketio.

Run them with ``bench/run`` (see docs/BENCHMARKS.md). Nothing here is imported by the
gateway or by the tests.
"""
