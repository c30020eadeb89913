"""
The operators and their backends: `topk_gate` and `orthonormalize` (`operators`), their plain-PyTorch
twins (`reference`: the oracle of the tests and the fallback), which implementation runs (`backend`,
`_extension`: the compiled `tdmpc2_moe._C`, built ahead of time or on first import) and the self-check
of the kernels before their first use on a device (`kernel_check`).

Imports `settings` and nothing else of the package.
"""
from .operators import Gate, backend, backend_reason, orthonormalize, topk_gate

__all__ = ["Gate", "backend", "backend_reason", "orthonormalize", "topk_gate"]
