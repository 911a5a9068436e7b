"""Triton kernels for quantised weights (bipolar-INT bit planes): the optional `gpu` extra. These
modules import triton at the top; the rest of kvflow imports them only lazily (bitplane_cuda.py)."""
