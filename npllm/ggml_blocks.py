"""The GGUF block layouts npllm computes with, in one place for the loader and the kernels.

``npllm.model.weights`` checks packed tensors at load without importing Numba, and
``npllm.kernels.quantized`` reads them; both take the layouts from here. The sizes are
``gguf.constants.GGML_QUANT_SIZES`` (tests/test_quantized.py checks that they agree).
"""
import numpy as np

BLOCK = 32  # weights per block
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # bytes per block of each type that has a kernel


def aligned(blocks):
    """``blocks`` as the kernels read them: C-contiguous, at an even address (they read the f16
    scales as uint16); copied only if it is not already."""
    if not blocks.flags.c_contiguous or blocks.ctypes.data % 2:
        blocks = np.array(blocks, order="C")
    return blocks
