"""Kernels of fastfair: Triton kernels and their plain-PyTorch reference (``naive.py``).

Installed inside the ``fastfair`` package (never as a top-level ``kernels`` module). Importing this
package does not import triton; the Triton modules are loaded only when the triton backend is used.
"""
