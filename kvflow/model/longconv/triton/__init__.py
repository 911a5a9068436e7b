"""Triton kernels of long-conv models (FlashButterfly): the optional `gpu` extra. These modules import triton
at the top; the rest of kvflow imports them only lazily (model/longconv/conv.py)."""
