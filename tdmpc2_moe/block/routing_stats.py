"""
Routing statistics, computed in this one place from routing vectors: a row's routing vector is its
top-k weights scattered into their experts' E slots, zeros elsewhere (what the gate history ring
holds). The gate history (`GateHistory.stats`), a router without history (its latest batch), the
training snapshots, `play`'s planner record and the cross-rank reduction (distributed.py) all use it.

The statistics are sums over rows divided by a row count (`statistic_sums` -> `from_sums`), so that
statistics over several sets of rows (ranks) combine exactly by adding their sums.
- `usage` [E]: share of routing slots (non-zero weights) per expert; `max_load` []: its largest entry;
- `mean_weight` [E]: mean routing weight per expert;
- `entropy` []: mean routing entropy (nats) of the rows;
- `rows` []: the rows counted.
Only tensor operations: on the device, no host synchronisation.
"""
import torch


def row_entropy(weights):
	"""Returns the routing entropy (nats) of each routing vector of `weights` [..., E], with 0 log 0 = 0."""
	return -(weights * torch.log(weights.clamp(min=1e-12))).sum(-1)


def statistic_sums(weights):
	"""Returns {slots [E], weight [E], entropy []}: the per-row quantities of `weights` [R, E] summed over rows."""
	return {"slots": (weights > 0).sum(0).to(weights.dtype), "weight": weights.sum(0),
			"entropy": row_entropy(weights).sum()}


def topk_statistic_sums(weights, indices, n_experts):
	"""
	Returns the `statistic_sums` of the routing vectors that top-k `weights` [N, k] at `indices` [N, k]
	scatter into `n_experts` slots, without building those [N, E] vectors (cheaper per forward).
	"""
	flat_weights, flat_indices = weights.reshape(-1), indices.reshape(-1)
	per_expert = lambda values: weights.new_zeros(n_experts).index_add_(0, flat_indices, values)  # noqa: E731
	return {"slots": per_expert((flat_weights > 0).to(weights.dtype)), "weight": per_expert(flat_weights),
			"entropy": row_entropy(weights).sum()}


def from_sums(sums, rows):
	"""
	Returns the statistics of rows whose `statistic_sums` are `sums`, `rows` of them (an int or a
	tensor; all-zero rows among them, such as the unfilled part of a ring, add nothing but count).
	"""
	per_row = rows.clamp(min=1) if torch.is_tensor(rows) else max(rows, 1)
	usage = sums["slots"] / sums["slots"].sum().clamp(min=1)
	return {"usage": usage, "mean_weight": sums["weight"] / per_row, "entropy": sums["entropy"] / per_row,
			"max_load": usage.max(), "rows": rows}


def summarize(weights, rows=None):
	"""Returns the statistics (module docstring) of the routing vectors `weights` [R, E] over `rows` rows (default R)."""
	return from_sums(statistic_sums(weights), weights.shape[0] if rows is None else rows)
