"""Selecting PyTorch's math attention kernel where a graph is differentiated twice."""
import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Select PyTorch's math kernel for ``scaled_dot_product_attention`` inside the block.

    The flash and memory-efficient kernels have no double backward; the math kernel is plain
    autograd. The caller's backend selection is restored on exit, also when an exception escapes.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        sdpa_kernel = None
    if sdpa_kernel is not None:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    elif hasattr(torch.backends.cuda, "sdp_kernel"):  # torch 2.0 - 2.2
        with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False):
            yield
    else:  # torch < 2.0 has no fused attention kernels
        yield
