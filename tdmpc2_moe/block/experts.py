"""
Experts: what a MoEBlock computes once its router has chosen (docs/design.md 5, 5a, 5b). E experts of
TD-MPC2's layer structure stored batched (expert_layers.py), the shared last layer, the
orthonormalisation of the experts' features, and how the experts run: dense (every expert on every
row) or sparse (each row's top-k experts only, dispatch.py). It takes the routing as an argument, a
`Gate`, and knows nothing of how it was chosen.
"""
import torch
import torch.nn as nn

from .dispatch import choose, fused_plan, group_by_expert, run_expert, run_fused, run_grouped, run_padded, static_path
from .expert_layers import ExpertLinear, SharedLinear
from ..ops.operators import orthonormalize


class Experts(nn.Module):
	"""
	The experts of a MoEBlock with `options` (settings.BlockOptions): hidden widths `mlp_dims` (each
	`expert_dim` wide when that is set), then `out_dim`; NormedLinear hidden layers with `dropout` on
	the first, a last layer that is a plain Linear, or a NormedLinear with `act` (or with `last_norm`).
	With `shared_head` the experts are the hidden layers and `layers[-1]` is one SharedLinear run after
	mixing. `batched` picks how the dense path runs the experts: one batched matmul per layer (True) or
	per expert on views of the stacked weights (False); None (default) is per expert on the CPU, where
	BLAS GEMMs with a fused LayerNorm beat bmm with a separate affine (benchmarks/README.md section 2).
	"""

	def __init__(self, in_dim, mlp_dims, out_dim, act, dropout, options):
		super().__init__()
		self.options = options
		if options.expert_dim is not None:
			mlp_dims = [options.expert_dim] * len(mlp_dims)
		if options.shared_head and not mlp_dims:
			raise ValueError("shared_head=True needs at least one hidden layer (mlp_dims is empty): the experts "
							 "are the hidden layers and the last layer is shared")
		if options.orthogonal:
			width, what = (mlp_dims[-1], "mlp_dims[-1]") if options.shared_head else (out_dim, "out_dim")
			if options.n_experts > width:
				raise ValueError(f"orthogonal=True needs n_experts <= the width of the mixed features ({what}={width}), "
								 f"got n_experts={options.n_experts}: at most {width} vectors of width {width} can be "
								 "orthonormal")
		e, dims = options.n_experts, [in_dim, *mlp_dims, out_dim]
		layers = [ExpertLinear(e, dims[i], dims[i + 1], norm=True, dropout=dropout * (i == 0)) for i in range(len(dims) - 2)]
		last_is_normed = act is not None or options.last_norm
		if options.shared_head:
			layers.append(SharedLinear(dims[-2], dims[-1], norm=last_is_normed, act=act))
		else:
			layers.append(ExpertLinear(e, dims[-2], dims[-1], norm=last_is_normed, act=act))
		self.layers = nn.ModuleList(layers)
		self.batched = None

	@property
	def expert_layers(self):
		"""Returns the layers each expert has its own of: all of them, or the hidden ones with `shared_head`."""
		return self.layers[:-1] if self.options.shared_head else self.layers

	def _is_batched(self, x):
		return self.batched if self.batched is not None else x.device.type != "cpu"

	def _views(self):
		return [layer.expert_views() for layer in self.expert_layers]

	def features(self, x):
		"""
		Returns every expert's output for `x` [N, in_dim], stacked [E, N, out_dim] (with `shared_head`,
		the experts' last hidden features [E, N, mlp_dims[-1]], which the shared layer reads once mixed).
		"""
		if not self._is_batched(x):
			views = self._views()
			return torch.stack([run_expert(self.expert_layers, views, x, e) for e in range(self.options.n_experts)])
		for layer in self.expert_layers:
			x = layer(x)
		return x

	def dispatch_for(self, x, fused=None):
		"""
		Returns "dense" or "sparse": how the experts run the rows `x` [N, in_dim] (`dispatch.choose`); `fused`
		says whether the sparse form is the compiled op (None: whether `dispatch.fused_plan` finds it runs).
		"""
		o = self.options
		if fused is None:
			fused = not o.orthogonal and fused_plan(self.expert_layers, x) is not None
		return choose(o.dispatch, static=static_path(x.device.type), grad=torch.is_grad_enabled(), rows=x.shape[0],
					  n_experts=o.n_experts, top_k=o.top_k, orthogonal=o.orthogonal, fused=fused)

	def forward(self, x, gate):
		"""
		Returns the mixture, routed by `gate` (a Gate of the rows of `x`), of the experts' outputs for
		`x` [N, in_dim] (with `orthogonal`, of their orthonormalised features; with `shared_head`,
		passed through the shared last layer): [N, out_dim].
		"""
		plan = fused_plan(self.expert_layers, x) if not self.options.orthogonal else None
		if self.dispatch_for(x, plan is not None) == "sparse" and x.shape[0]:
			if plan is not None:
				out = run_fused(plan, x, gate)
			else:
				grouping = group_by_expert(gate.indices, gate.weights, self.options.n_experts)
				if static_path(x.device.type):
					out = run_padded(self.expert_layers, x, grouping, self.options.n_experts)
				else:
					out = run_grouped(self.expert_layers, x, grouping)
		else:
			out = self._dense(x, gate)
		return self.layers[-1](out) if self.options.shared_head else out

	def _dense(self, x, gate):
		# Every expert on every row, combined through the dense [N, E] routing matrix.
		e = self.options.n_experts
		dtype = self.layers[-1].weight.dtype
		routing = torch.zeros(x.shape[0], e, dtype=dtype, device=x.device)
		routing = routing.scatter(1, gate.indices, gate.weights.to(dtype))
		if self._is_batched(x) or self.options.orthogonal:
			features = self.features(x)
			if self.options.orthogonal:
				features = orthonormalize(features)
			return (routing.t().unsqueeze(-1) * features).sum(0)
		views = self._views()
		out = routing[:, :1] * run_expert(self.expert_layers, views, x, 0)
		for i in range(1, e):
			out = torch.addcmul(out, routing[:, i:i + 1], run_expert(self.expert_layers, views, x, i))
		return out
