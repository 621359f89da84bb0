"""The engine: one thread owns the model and its tensors and decodes every request in shared steps."""
