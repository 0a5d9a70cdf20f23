"""Tensor operations that merge strategies are composed of (pure torch on CPU, optional accelerated kernels)."""
