"""
The layers MoE experts are made of. `ExpertLinear`: E parallel Linear (or TD-MPC2 NormedLinear) layers
stored batched; stacked weights ([E, out, in]) let one batched matmul run all experts of a layer, and
keep `block[-1].weight` meaning "the last layer of every expert" for upstream code. `SharedLinear`:
the one last layer a `shared_head` block runs after mixing the experts' features.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ExpertLinear(nn.Module):
	"""
	E parallel Linear layers, stored batched (`weight` [E, out, in], `bias` [E, out]) so that one
	batched matmul runs every expert. With `norm=True` it is the batched counterpart of TD-MPC2's
	NormedLinear: Linear -> dropout -> per-expert LayerNorm -> `act` (Mish unless given).
	"""

	def __init__(self, n_experts, in_features, out_features, *, norm=False, act=None, dropout=0.):
		super().__init__()
		self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
		self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
		self.bias = nn.Parameter(torch.empty(n_experts, out_features))
		self.norm = norm
		if norm:
			self.ln_weight = nn.Parameter(torch.ones(n_experts, out_features))
			self.ln_bias = nn.Parameter(torch.zeros(n_experts, out_features))
			self.act = act if act is not None else nn.Mish(inplace=False)
			self.dropout = nn.Dropout(dropout, inplace=False) if dropout else None
		self.reset_parameters()

	def reset_parameters(self):
		"""TD-MPC2's `init.weight_init` for every expert: truncated normal (std 0.02) weights, zero bias."""
		nn.init.trunc_normal_(self.weight, std=0.02)
		nn.init.zeros_(self.bias)
		if self.norm:
			nn.init.ones_(self.ln_weight)
			nn.init.zeros_(self.ln_bias)

	def forward(self, x):
		"""
		Returns [E, N, out]. `x` is [N, in] (the block input, shared by every expert: one matmul
		against all experts' weights) or [E, N, in] (each expert's own hidden state: one bmm).
		"""
		if x.dim() == 2:
			w = self.weight.reshape(self.n_experts * self.out_features, self.in_features)
			y = F.linear(x, w).view(x.shape[0], self.n_experts, self.out_features).transpose(0, 1)
			y = y + self.bias.unsqueeze(1)
		else:
			y = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
		if not self.norm:
			return y
		if self.dropout is not None:
			y = self.dropout(y)
		y = F.layer_norm(y, (self.out_features,))
		return self.act(torch.addcmul(self.ln_bias.unsqueeze(1), y, self.ln_weight.unsqueeze(1)))

	def expert_views(self):
		"""
		Returns each expert's parameters, [(weight, bias, ln_weight, ln_bias)] * E (ln_* None without
		norm), split from the stacked tensors by one `unbind` each. Indexing `self.weight[e]` per expert
		would cost, in backward, a full-size zero gradient per view, summed E times; unbind's backward
		stacks the E gradients once (zeros for experts that were not run).
		"""
		params = [self.weight.unbind(0), self.bias.unbind(0)]
		params += [self.ln_weight.unbind(0), self.ln_bias.unbind(0)] if self.norm else [[None] * self.n_experts] * 2
		return list(zip(*params))

	def forward_with(self, x, weight, bias, ln_weight, ln_bias):
		"""Returns one expert's output [N, out] for its input `x` [N, in] and its parameters (from `expert_views`)."""
		y = F.linear(x, weight, bias)
		if not self.norm:
			return y
		if self.dropout is not None:
			y = self.dropout(y)
		return self.act(F.layer_norm(y, (self.out_features,), ln_weight, ln_bias))

	def fused_activation(self):
		"""
		Returns what ops.routed_experts runs after this layer's Linear: "none" (a plain Linear), "mish", or
		("simnorm", group width) for TD-MPC2's SimNorm (recognised by its class name and `dim`: softmax over
		groups of `dim` features); None when the op cannot run this layer (another activation, or dropout
		while training).
		"""
		if not self.norm:
			return "none"
		if self.dropout is not None and self.training:
			return None
		if type(self.act) is nn.Mish:
			return "mish"
		if type(self.act).__name__ == "SimNorm" and isinstance(getattr(self.act, "dim", None), int) and \
				self.out_features % self.act.dim == 0:
			return "simnorm", self.act.dim
		return None

	def fused_params(self):
		"""Returns this layer's parameters as ops.routed_experts takes them: weight, bias (and LayerNorm weight, bias)."""
		return [self.weight, self.bias, self.ln_weight, self.ln_bias] if self.norm else [self.weight, self.bias]

	def forward_tiles(self, x, tile_expert):
		"""
		Returns [T_n, T, out] for tiles of rows `x` [T_n, T, in], tile t run by expert `tile_expert[t]`:
		one batched matmul against the tiles' gathered weights (the padded sparse dispatch, dispatch.py).
		"""
		y = torch.baddbmm(self.bias.index_select(0, tile_expert).unsqueeze(1), x,
						  self.weight.index_select(0, tile_expert).transpose(1, 2))
		if not self.norm:
			return y
		if self.dropout is not None:
			y = self.dropout(y)
		y = F.layer_norm(y, (self.out_features,))
		return self.act(torch.addcmul(self.ln_bias.index_select(0, tile_expert).unsqueeze(1), y,
									  self.ln_weight.index_select(0, tile_expert).unsqueeze(1)))

	def extra_repr(self):
		act = f", act={self.act.__class__.__name__}" if self.norm else ""
		return f"n_experts={self.n_experts}, in_features={self.in_features}, out_features={self.out_features}, " \
			f"norm={self.norm}{act}"


class SharedLinear(nn.Module):
	"""
	The last layer of a `shared_head` MoEBlock, run once on the mixed expert features: a Linear, with
	`norm=True` followed by LayerNorm and `act` (upstream's NormedLinear). Parameters are named as in
	ExpertLinear without the expert dimension (`weight` [out, in], `bias`, `ln_weight`, `ln_bias`).
	"""

	def __init__(self, in_features, out_features, *, norm=False, act=None):
		super().__init__()
		self.in_features, self.out_features, self.norm = in_features, out_features, norm
		self.weight = nn.Parameter(torch.empty(out_features, in_features))
		self.bias = nn.Parameter(torch.zeros(out_features))
		nn.init.trunc_normal_(self.weight, std=0.02)
		if norm:
			self.ln_weight = nn.Parameter(torch.ones(out_features))
			self.ln_bias = nn.Parameter(torch.zeros(out_features))
			self.act = act if act is not None else nn.Mish(inplace=False)

	def forward(self, x):
		"""Returns the layer's output [N, out] for the mixed features `x` [N, in]."""
		y = F.linear(x, self.weight, self.bias)
		if not self.norm:
			return y
		return self.act(F.layer_norm(y, (self.out_features,), self.ln_weight, self.ln_bias))

	def extra_repr(self):
		act = f", act={self.act.__class__.__name__}" if self.norm else ""
		return f"in_features={self.in_features}, out_features={self.out_features}, norm={self.norm}{act}"
