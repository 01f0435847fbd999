"""Black-box tests: a real WebSocket against the app served by Hypercorn on loopback."""
