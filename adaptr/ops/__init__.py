"""Tensor operations that merge strategies are composed of (pure-torch reference/CPU path first)."""
