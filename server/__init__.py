"""loraplex: one 4-bit base model, many LoRA adapters decoded in the same batch."""

__version__ = "0.1.0"
