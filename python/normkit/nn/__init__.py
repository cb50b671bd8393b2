"""Stateful layers over NumPy / CuPy arrays, in PyTorch's vocabulary."""
