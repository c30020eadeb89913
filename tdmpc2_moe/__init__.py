"""
tdmpc2_moe: Mixture-of-Experts world-model heads for TD-MPC2 with a fused top-k gating operator.

This module is the public face. The package holds one folder per layer of docs/architecture.md,
bottom to top: `settings` (the options record, checks), `ops` (the operators and their backends),
`block` (MoEBlock, router, experts), `analysis` (statistics, snapshots, plots, run comparison, the
memory monitor), `upstream` (the patch and the TD-MPC2 side), `runs` (training, resume, sweeps,
checkpoints), and `cli` (the `tdmpc2-moe` command).
"""
from . import _moved
from .analysis.monitor import MemoryMonitor
from .block.history import GateHistory
from .block.moe import MoEBlock
from .ops.kernel_check import SelfCheckError, self_check
from .ops.operators import Gate, backend, topk_gate
from .upstream.patching import is_patched, patch, unpatch

_moved.install()

__all__ = ["Gate", "GateHistory", "MemoryMonitor", "MoEBlock", "SelfCheckError", "backend", "is_patched", "patch",
		   "self_check", "topk_gate", "unpatch"]
