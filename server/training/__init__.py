"""Persona adapters made by the project: style transforms, the data builder, a QLoRA trainer and
the evaluation of the trained adapters."""
