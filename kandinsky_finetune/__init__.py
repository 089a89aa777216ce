"""Shared pieces of the four Kandinsky 2.2 fine-tuning scripts (one module per concern)."""
