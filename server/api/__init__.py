"""HTTP edge: OpenAI-compatible routes over the engine thread."""
