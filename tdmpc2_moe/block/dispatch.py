"""
Sparse expert dispatch for MoEBlock (docs/design.md 5b): run only each row's top-k experts.

The N*k routing slots (row r's j-th choice is slot r*k + j) are grouped per expert from the gate's
`indices` with torch ops: a stable argsort of the slots' expert ids gives the permutation, a
scatter-add the per-expert counts. Each expert then runs on its rows only and the outputs come back
with one weighted `index_add` over the rows. Three ways to run the groups:

- `run_fused`: the compiled operator `ops.routed_experts` (docs/design.md 22) does all of it in one call:
  grouping, each expert's layers on exactly its rows, the weighted combination, and the backward. Static
  shapes (traceable by torch.compile, CUDA-graph safe), so it serves the CPU, CUDA and compiled blocks
  alike wherever the extension has a kernel for the device and the layers are ones it runs
  (`fused_plan`); the two below remain for the others (the reference backend, other activations,
  dropout while training, other dtypes).

- `run_grouped`: one GEMM per layer per expert on exactly its rows. The group boundaries are read
  from a CPU tensor (`tensor_split` at the counts' cumulative sums), so the shapes depend on the
  data: used on the CPU in eager mode only, where that read is no device-to-host copy and no sync.
- `run_padded`: static shapes, no host read, so CUDA-graph safe and traceable by torch.compile
  without data-dependent shapes: each expert's group is padded to a multiple of a tile of T rows and
  placed in a buffer of a fixed number of tiles (an upper bound that holds for any routing), and
  every tile runs as one batched matmul against its expert's weights (gathered per tile). Padding
  slots read a zero row and carry weight 0. Used on CUDA and whenever torch.compile traces the block.

`choose` holds the "auto" rule and the combinations where sparse is meaningless.
"""
import math
from typing import NamedTuple

import torch

from ..ops.operators import routed_experts, routed_experts_runs_on


class Grouping(NamedTuple):
	"""The N*k routing slots grouped per expert: slots sorted by expert (stable: by row within an expert)."""
	rows: torch.Tensor  # [S] int64: the row of each sorted slot
	weights: torch.Tensor  # [S]: the routing weight of each sorted slot (differentiable)
	experts: torch.Tensor  # [S] int64: the expert of each sorted slot (non-decreasing)
	counts: torch.Tensor  # [E] int64: slots per expert


def group_by_expert(indices, weights, n_experts):
	"""Returns the `Grouping` of a gate's `indices` [N, k] (int64) and `weights` [N, k]; no host sync."""
	k = indices.shape[1]
	flat = indices.reshape(-1)
	order = torch.argsort(flat, stable=True)
	counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
	return Grouping(torch.div(order, k, rounding_mode="floor"), weights.reshape(-1)[order], flat[order], counts)


def static_path(device_type):
	"""Returns whether the block's sparse form must have static shapes: on CUDA (no host sync) and while torch.compile traces."""
	return device_type != "cpu" or torch.compiler.is_compiling()


def choose(dispatch, *, static, grad, rows, n_experts, top_k, orthogonal, fused=False):
	"""
	Returns "dense" or "sparse" for a block's `dispatch` setting and the shape at hand; `static` says
	which sparse path would run (`static_path`: the padded one, else the exact groups), `grad` whether
	autograd records the forward (a backward will follow). Sparse is
	meaningless with `orthogonal` (each row's E features are orthonormalised together, so every expert
	runs on every row: MoEBlock refuses dispatch="sparse" with it) and gains nothing when
	top_k == n_experts (every expert runs on every row either way); "auto" picks dense then, and for
	an empty batch. Otherwise "auto" follows the CPU measurements in benchmarks/README.md section 5:
	- exact groups: sparse from SPARSE_MIN_ROWS rows when E >= 2k, from SPARSE_MIN_ROWS_NARROW rows
	  when k < E < 2k (fewer experts per row skipped: sparse needs more rows to pay for the grouping);
	- padded (CUDA, torch.compile): sparse when E >= 2k, from SPARSE_MIN_ROWS rows without grad and
	  from PADDED_MIN_ROWS_GRAD rows with grad (its backward reduces a weight gradient per tile, which
	  small batches do not repay). Not yet measured on a GPU: the rule is the CPU's.
	"""
	if dispatch != "auto":
		return dispatch
	if orthogonal or rows == 0:
		return "dense"
	if fused:
		return "sparse"
	if top_k == n_experts:
		return "dense"
	if static:
		if n_experts < 2 * top_k:
			return "dense"
		return "sparse" if rows >= (PADDED_MIN_ROWS_GRAD if grad else SPARSE_MIN_ROWS) else "dense"
	return "sparse" if rows >= (SPARSE_MIN_ROWS if n_experts >= 2 * top_k else SPARSE_MIN_ROWS_NARROW) else "dense"


SPARSE_MIN_ROWS = 16
SPARSE_MIN_ROWS_NARROW = 64
PADDED_MIN_ROWS_GRAD = 1024


def fused_plan(layers, x):
	"""
	Returns (params, activations, simnorm_dim), the arguments of ops.routed_experts for the expert layers
	`layers` (ExpertLinear) on rows `x`, or None when the op cannot run them here: no compiled kernel for
	x's device, a layer it does not run (ExpertLinear.fused_activation), or dtypes other than x's float32
	or float64.
	"""
	if not routed_experts_runs_on(x.device) or x.dtype not in (torch.float32, torch.float64):
		return None
	params, activations, group = [], [], None
	for layer in layers:
		activation = layer.fused_activation()
		if activation is None or layer.weight.dtype != x.dtype:
			return None
		if isinstance(activation, tuple):
			activation, width = activation
			if group not in (None, width):
				return None
			group = width
		activations.append(activation)
		params += layer.fused_params()
	return params, activations, group or 1


def run_fused(plan, x, gate):
	"""Returns the top-k mixture of the experts of `plan` (`fused_plan`) for rows `x` [N, in] routed by `gate`."""
	params, activations, group = plan
	return routed_experts(x, gate.indices, gate.weights, params, activations, simnorm_dim=group)


def _combine(y, rows, weights, n_rows):
	"""Returns, per row, the sum over its slots of weight * expert output `y`: [n_rows, out] (one index_add)."""
	out = y.new_zeros(n_rows, y.shape[1])
	return out.index_add(0, rows, y * weights.to(y.dtype).unsqueeze(1))


def run_expert(layers, views, x, e):
	"""Returns expert `e`'s output for its rows `x` [N, in]: `layers` (ExpertLinear) with their `expert_views`."""
	for layer, v in zip(layers, views):
		x = layer.forward_with(x, *v[e])
	return x


def run_grouped(layers, x, grouping):
	"""
	Returns the top-k mixture of the experts made of `layers` (ExpertLinear) for rows `x` [N, in]:
	one GEMM per layer per expert on its rows. Splits at group boundaries read from the CPU tensor
	of counts (CPU eager only).
	Each stacked parameter is split once per forward (`ExpertLinear.expert_views`, one `unbind`):
	its backward writes one stacked gradient, with zeros for experts that got no rows.
	"""
	views = [layer.expert_views() for layer in layers]
	chunks = x.index_select(0, grouping.rows).tensor_split(torch.cumsum(grouping.counts, 0)[:-1])
	outs = [run_expert(layers, views, h, e) for e, h in enumerate(chunks) if h.shape[0]]
	return _combine(torch.cat(outs), grouping.rows, grouping.weights, x.shape[0])


def tile_rows(slots, n_experts):
	"""
	Returns the tile size T of the padded path for `slots` = N*k routing slots: half the mean slots per
	expert, rounded down to a power of two in 8..1024. The padded buffer holds up to
	slots + E * (T - 1) rows, and each tile gathers its expert's weights (and its weight gradient is
	reduced back per tile): a smaller T wastes fewer rows, a larger one gathers fewer weight copies.
	The choice is the faster of the ones measured on the CPU (benchmarks/README.md section 5).
	"""
	half = max(slots // (2 * n_experts), 1)
	return min(1024, max(8, 1 << (half.bit_length() - 1)))


def run_padded(layers, x, grouping, n_experts):
	"""
	Returns the same mixture as `run_grouped` with static shapes and no host read: each expert's slots
	padded to a multiple of T = `tile_rows(...)` in a buffer of ceil((S + E*(T-1)) / T) tiles, one
	batched matmul per layer over the tiles with each tile's expert's weights. Padding slots read a
	zero row (so a NaN row never leaks into padding) and have weight 0; experts without slots own no
	tile, so their gradients are zero (index_select's backward).
	"""
	n, s = x.shape[0], grouping.rows.shape[0]
	tile = tile_rows(s, n_experts)
	n_tiles = math.ceil((s + n_experts * (tile - 1)) / tile)
	counts = grouping.counts
	padded = torch.div(counts + tile - 1, tile, rounding_mode="floor") * tile
	padded_end = torch.cumsum(padded, 0)
	start, padded_start = torch.cumsum(counts, 0) - counts, padded_end - padded
	rank = torch.arange(s, device=x.device) - start[grouping.experts]
	dest = padded_start[grouping.experts] + rank
	slot_rows = torch.full((n_tiles * tile,), n, dtype=torch.int64, device=x.device).scatter(0, dest, grouping.rows)
	slot_weights = grouping.weights.new_zeros(n_tiles * tile).scatter(0, dest, grouping.weights)
	tile_expert = torch.searchsorted(padded_end, torch.arange(n_tiles, device=x.device) * tile, right=True)
	tile_expert = tile_expert.clamp(max=n_experts - 1)
	h = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, slot_rows).view(n_tiles, tile, x.shape[1])
	for layer in layers:
		h = layer.forward_tiles(h, tile_expert)
	return _combine(h.reshape(n_tiles * tile, h.shape[-1]), slot_rows, slot_weights, n + 1)[:n]
