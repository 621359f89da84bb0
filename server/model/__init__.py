"""The base model: finding it on disk, converting the default GGUF once, loading it in 4-bit."""
