"""tdmpc2_moe: Mixture-of-Experts world-model heads for TD-MPC2 with a fused top-k gating operator."""
from .history import GateHistory
from .ops import Gate, backend, topk_gate

__all__ = ["Gate", "GateHistory", "backend", "topk_gate"]
