"""tdmpc2_moe: Mixture-of-Experts world-model heads for TD-MPC2 with a fused top-k gating operator."""
from .history import GateHistory
from .monitor import MemoryMonitor
from .moe import MoEBlock
from .ops import Gate, backend, topk_gate
from .patching import is_patched, patch, unpatch
from .kernel_check import SelfCheckError, self_check

__all__ = ["Gate", "GateHistory", "MemoryMonitor", "MoEBlock", "SelfCheckError", "backend", "is_patched", "patch",
		   "self_check", "topk_gate", "unpatch"]
