"""
The fork-style leaky MoE block (list of `gate.detach().cpu()` copies, accumulating aux buffer,
optional trim-at-1000 / clear-per-update / gc-every-100 fix) and a plain TD-MPC2-shaped mlp.
The implementation lives in `tdmpc2_moe.leaky` because `tdmpc2-moe demo` needs it installed;
benchmarks import it from here.
"""
from tdmpc2_moe.leaky import LeakyMoEBlock, NormedLinear, plain_mlp

__all__ = ["LeakyMoEBlock", "NormedLinear", "plain_mlp"]
