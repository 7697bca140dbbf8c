"""`herd serve`: an OpenAI-compatible HTTP server on the generation engine."""
