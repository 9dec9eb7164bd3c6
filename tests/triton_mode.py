"""How the Triton tests choose their mode, shared by tests/test_triton_*.py.

GPU: CUDA is there and TRITON_INTERPRET is not 1 (bench/gpu_kernels.sh runs the tests that way).
CPU: the interpreter; tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton
(triton fixes the mode at import, and re-importing it in one process aborts).
"""
from __future__ import annotations

import os

import pytest
import torch

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def import_backend():
    """fastfair's triton backend module, or a skip that says why it cannot run here."""
    if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on CPU the Triton tests need TRITON_INTERPRET=1 before triton is imported "
                    "(tests/conftest.py sets it)", allow_module_level=True)
    pytest.importorskip("triton")
    from fastfair.kernels import triton_ops

    return triton_ops
