"""Flax modules and the pure functions that compose them into LLaVA-NeXT."""
