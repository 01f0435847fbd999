"""Where the process starts: configuration, the composition root, the ASGI app, the CLI."""
