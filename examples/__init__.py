"""Examples a user copies: run from the repo root so `examples.<module>` is importable."""
