"""MoEBlock: a Mixture-of-Experts drop-in for TD-MPC2's `layers.mlp`, a router and the experts it routes to."""
import dataclasses
import inspect

import torch.nn as nn

from ..settings.checks import check_int, check_number
from .experts import Experts
from .router import Router
from ..settings.record import BlockOptions

# Where the parameters of a block saved before the router/experts split now live (old prefix -> new).
_MOVED = {"gate.": "router.gate.", "adaptive_temperature.": "router.adaptive_temperature.", "layers.": "experts.layers."}


def _load_old_layout(module, state_dict, prefix, *args):
	for key in [k for k in state_dict if k.startswith(prefix)]:
		rest = key[len(prefix):]
		for old, new in _MOVED.items():
			if rest.startswith(old):
				state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)


class MoEBlock(nn.Module):
	"""
	Mixture-of-Experts drop-in for TD-MPC2's `layers.mlp(in_dim, mlp_dims, out_dim, act, dropout)`
	(docs/design.md 5): E experts of upstream's layer structure (`experts`, experts.py), a linear gate
	with `topk_gate` (`router`, router.py), and the top-k weighted sum of the expert outputs.
	Options are keywords (e.g. `n_experts=4, top_k=2, temperature=1.0, history_rows=65536`), or a
	`settings.BlockOptions` as `options` with keywords replacing its fields: the fields of BlockOptions,
	each declared and documented once in `settings.MoESettings` (the fork's model, docs/design.md 5a, is
	options too); `inspect.signature(MoEBlock)` lists them with their defaults.
	The load-balancing (+ z) loss rides on the output's autograd graph: whatever loss is
	backpropagated through the output also trains the gate towards balance; nothing accumulates.
	"""

	def __init__(self, in_dim, mlp_dims, out_dim, act=None, dropout=0., *, options=None, **keywords):
		super().__init__()
		options = BlockOptions(**keywords) if options is None else dataclasses.replace(options, **keywords)
		mlp_dims = [mlp_dims] if isinstance(mlp_dims, int) else list(mlp_dims)
		for i, d in enumerate([in_dim, *mlp_dims, out_dim]):
			check_int("in_dim" if i == 0 else "out_dim" if i == len(mlp_dims) + 1 else "mlp_dims", d, 1)
		check_number("dropout", dropout, positive=False)
		self.in_dim, self.out_dim, self.options = in_dim, out_dim, options
		# Experts before the router: parameters drawn in the order of blocks built before the split, so that
		# a seed gives the same model as it did then.
		self.experts = Experts(in_dim, mlp_dims, out_dim, act, dropout, options)
		self.router = Router(in_dim, options)
		self.register_load_state_dict_pre_hook(_load_old_layout)

	@property
	def n_experts(self):
		return self.options.n_experts

	@property
	def top_k(self):
		return self.options.top_k

	@property
	def gate(self):
		"""Returns the router's linear gate."""
		return self.router.gate

	@property
	def history(self):
		"""Returns the router's GateHistory, or None when the block keeps none."""
		return self.router.history

	@property
	def layers(self):
		"""Returns the experts' layers (an nn.ModuleList; the last one is shared with `shared_head`)."""
		return self.experts.layers

	def __getitem__(self, idx):
		"""
		Returns layer `idx` (an ExpertLinear); `block[-1].weight` is every expert's last-layer weight
		[E, out, in], or with `shared_head` the shared last layer's (a SharedLinear) weight [out, in].
		"""
		return self.experts.layers[idx]

	def __len__(self):
		return len(self.experts.layers)

	@property
	def last_aux_loss(self):
		"""Returns the aux loss of the latest forward (detached scalar tensor on the block's device)."""
		return self.router._last_aux

	def route(self, x, history=None):
		"""Returns the `Gate` of the rows of `x` [..., in_dim] as the block routes them (`Router.route`)."""
		return self.router.route(x, history)

	def stats(self):
		"""Returns the router's routing statistics, aux loss and temperature as device tensors (`Router.stats`)."""
		return self.router.stats()

	def forward(self, x):
		"""
		Returns the top-k mixture of expert outputs, [..., out_dim] for `x` [..., in_dim]. A training
		forward (train mode, grad enabled) also steps the adaptive temperature.
		"""
		if x.shape[-1] != self.in_dim:
			raise ValueError(f"x must have last dimension in_dim={self.in_dim}, got shape {tuple(x.shape)}")
		lead = x.shape[:-1]
		x = x.reshape(-1, self.in_dim)
		gate = self.router(x)
		out = self.router.with_aux_loss(self.experts(x, gate), gate)
		return out.reshape(*lead, self.out_dim)

	def extra_repr(self):
		changed = [f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options)
				   if f.name not in ("n_experts", "top_k") and getattr(self.options, f.name) != f.default]
		return ", ".join([f"n_experts={self.n_experts}", f"top_k={self.top_k}", *changed])


# help(MoEBlock) and inspect show the option keywords, derived from BlockOptions.
MoEBlock.__init__.__signature__ = inspect.signature(MoEBlock.__init__).replace(parameters=[
	*list(inspect.signature(MoEBlock.__init__).parameters.values())[:7],
	*[inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default) for f in dataclasses.fields(BlockOptions)]])
