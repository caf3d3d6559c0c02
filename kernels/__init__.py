"""Fused GPU kernels for the generator's blocks (Triton), their PyTorch reference and dispatch."""
