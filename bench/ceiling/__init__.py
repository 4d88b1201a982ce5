"""The ceiling: the least work a correct order needs, served by a minimal ASGI app."""
