"""Pure tests of the domain: unit, property and stateful tests, no I/O, no event loop."""
