"""
MoEBlock under `torch.distributed` (DistributedDataParallel): what stays on each rank, and routing
statistics combined across ranks.

What DDP does with a MoEBlock (tested with 2 CPU processes on gloo, tests/block/test_distributed.py):
- Gradients: every parameter (experts and gate) is in every rank's autograd graph in both dispatch
  modes. Dense runs every expert on every row; sparse runs each expert on its rows only, through
  views of the stacked expert parameters (`ExpertLinear.expert_views`, or the per-tile gather of the
  padded path), whose backward writes zeros for an expert that no row of the rank picked: a zero
  gradient, not a missing one. DDP needs no `find_unused_parameters=True`, and after each step the
  parameters are identical on every rank and equal those of one process trained on the whole batch.
- Aux loss (load balancing + z-loss) is rank-local: each rank's forward attaches the aux loss of its
  own rows, and DDP averages the gradients, so the model is trained on the mean over ranks of the
  per-rank aux losses. The z-loss is a mean over rows and equals its full-batch value; the Switch
  balance term `E * sum(frac * prob_mean)` is a product of two batch means and does not: with equal
  shards it is sum_e mean_r(frac_r,e * p_r,e), where the full batch gives sum_e mean_r(frac_r,e) *
  mean_r(p_r,e). Computing the global term would need an all-reduce inside every forward; balancing
  each rank's own rows is what Switch Transformer and DeepSpeed do, and it also balances the whole.
- Gate history and the latest-batch statistics are rank-local: each rank records its own rows.
  DDP broadcasts every module buffer from rank 0 before each forward (`broadcast_buffers=True`, its
  default), which would overwrite every rank's ring and cursor with rank 0's. Call
  `keep_routing_local(module)` before wrapping (other buffers, such as an adaptive gate temperature,
  stay synchronised from rank 0), or pass `broadcast_buffers=False` when no buffer needs syncing.
- `all_reduce_stats(stats)` combines the per-rank statistics into those of all ranks' rows.
"""
import torch
import torch.distributed as dist

from .moe import MoEBlock
from .routing_stats import from_sums

# MoEBlock buffers that describe the rows a rank routed: its GateHistory and its latest-batch record.
_ROUTING_BUFFERS = tuple(f"router.{name}" for name in ("history.ring", "history.cursor", "_last_aux", "_last_slots",
													   "_last_weight", "_last_entropy", "_last_rows"))


def routing_buffer_names(module):
	"""Returns the fully qualified names of the routing-record buffers of every MoEBlock in `module`."""
	names = []
	own = dict(module.named_buffers())
	for prefix, sub in module.named_modules():
		if isinstance(sub, MoEBlock):
			for name in _ROUTING_BUFFERS:
				full = f"{prefix}.{name}" if prefix else name
				if full in own:
					names.append(full)
	return names


def keep_routing_local(module):
	"""
	Marks the routing-record buffers of every MoEBlock in `module` (gate history ring and cursor,
	latest-batch statistics and aux loss) as ignored by DistributedDataParallel, so that DDP does
	not overwrite them with rank 0's at each forward. Call it on the plain module before wrapping
	it; other buffers are still broadcast. Returns the names marked (keeps names marked earlier).
	"""
	from torch.nn.parallel import DistributedDataParallel
	names = routing_buffer_names(module)
	earlier = list(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
	DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(dict.fromkeys(earlier + names)))
	return names


def all_reduce_stats(stats, rows=None, group=None):
	"""
	Returns routing statistics over the rows of every rank of `group` (default: the world), from
	this rank's `stats` (a `MoEBlock.stats()` or `GateHistory.stats()` dict). Every rank must call
	it (a collective: one all-reduce of E*2 + a few numbers). The statistics are per-row sums divided
	by the rows (routing_stats.py): each rank's sums are recovered from its statistics and rows,
	added over ranks, and divided by the total rows. So `mean_weight` and `entropy` equal those of the
	concatenated rows exactly, and `usage` (the share of routing slots) too when every row fills k
	slots (a top-k weight is never exactly 0 unless it underflows); `max_load` is the combined usage's
	largest entry, `rows` the sum of the ranks' rows. `aux_loss` and any other tensor (a temperature)
	are averaged over ranks: the aux loss is rank-local (see the module docstring), and its mean is the
	aux term DDP's averaged gradient trains. Rows come from `stats["rows"]`, else from `rows` (an int
	or tensor); ValueError naming `rows` if neither. A rank with 0 rows adds nothing; with 0 rows on
	every rank the statistics are zeros.
	"""
	if not isinstance(stats, dict) or not {"usage", "mean_weight", "entropy"} <= set(stats):
		raise ValueError("stats must be a dict from MoEBlock.stats() or GateHistory.stats() "
						 f"(with usage, mean_weight, entropy), got {type(stats).__name__}")
	if "rows" in stats:
		rows = stats["rows"]
	elif rows is None:
		raise ValueError("rows must be given when stats has no 'rows': pass the number of rows of the latest batch")
	usage = stats["usage"]
	device, n_experts = usage.device, usage.shape[0]
	r = torch.as_tensor(rows, dtype=torch.float64, device=device).reshape(1)
	others = sorted(k for k, v in stats.items()
					if k not in ("usage", "mean_weight", "entropy", "max_load", "rows") and torch.is_tensor(v))
	# One packed float64 vector, one all-reduce: [slots, weight sums, entropy sum, rows, other..., 1]; a rank's
	# slots are R * usage up to the factor k, which is the same on every rank and cancels in the share.
	packed = torch.cat([r * usage.double(), r * stats["mean_weight"].double(), r * stats["entropy"].double().reshape(1),
						r, *[stats[k].double().reshape(1) for k in others], torch.ones(1, dtype=torch.float64, device=device)])
	dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
	total_rows, ranks = packed[2 * n_experts + 1], packed[-1]
	sums = {"slots": packed[:n_experts], "weight": packed[n_experts:2 * n_experts], "entropy": packed[2 * n_experts]}
	out = from_sums(sums, total_rows)
	out = {"usage": out["usage"].to(usage.dtype), "mean_weight": out["mean_weight"].to(stats["mean_weight"].dtype),
		   "entropy": out["entropy"].to(stats["entropy"].dtype), "max_load": out["max_load"].to(usage.dtype),
		   "rows": total_rows.round().long()}
	for i, k in enumerate(others):
		out[k] = (packed[2 * n_experts + 2 + i] / ranks).to(stats[k].dtype).reshape(stats[k].shape)
	return out
