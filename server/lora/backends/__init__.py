"""LoRA backends other than the plain-torch reference in server/lora/ops.py."""
