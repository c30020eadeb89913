"""
The MoE block: `MoEBlock` (`moe`), the drop-in for TD-MPC2's `layers.mlp`, composed of a `Router`
(`router`: gate, temperature and its adaptation in `temperature`, `topk_gate`, the `GateHistory` ring
of `history`, the aux loss) and `Experts` (`experts`, with the batched layers of `expert_layers` and the
sparse dispatch of `dispatch`); routing statistics in one place (`routing_stats`), their combination
across DDP ranks (`distributed`), and the blocks it is measured against (`baselines`: the fork's leaky
block, a plain mlp; not API).

Imports `settings` and `ops`.
"""
