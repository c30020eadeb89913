"""
Measurement baselines, not API: the fork-style MoE block this package replaces (DESIGN.md sec. 1),
re-implemented to measure against -- a Python list of host copies of every gate, an aux-loss
accumulator nothing resets, optionally the fork's patch-up fix -- and a plain TD-MPC2-shaped mlp.
Used by `tdmpc2-moe demo`, tests and benchmarks (installed, because `demo` needs them).
"""
import gc

import torch
import torch.nn as nn
import torch.nn.functional as F


class NormedLinear(nn.Linear):
	"""Linear -> dropout -> LayerNorm -> activation (Mish unless given): TD-MPC2's hidden layer."""

	def __init__(self, in_features, out_features, dropout=0., act=None):
		super().__init__(in_features, out_features)
		self.ln = nn.LayerNorm(out_features)
		self.act = act if act is not None else nn.Mish(inplace=False)
		self.dropout = nn.Dropout(dropout, inplace=False) if dropout else None

	def forward(self, x):
		x = super().forward(x)
		if self.dropout is not None:
			x = self.dropout(x)
		return self.act(self.ln(x))


def plain_mlp(in_dim, mlp_dims, out_dim, act=None, dropout=0.):
	"""Returns an nn.Sequential with TD-MPC2's `layers.mlp` structure, initialised like TD-MPC2."""
	mlp_dims = [mlp_dims] if isinstance(mlp_dims, int) else list(mlp_dims)
	dims = [in_dim, *mlp_dims, out_dim]
	layers = [NormedLinear(dims[i], dims[i + 1], dropout=dropout * (i == 0)) for i in range(len(dims) - 2)]
	layers.append(NormedLinear(dims[-2], dims[-1], act=act) if act is not None else nn.Linear(dims[-2], dims[-1]))
	mlp = nn.Sequential(*layers)
	for m in mlp.modules():
		if isinstance(m, nn.Linear):
			nn.init.trunc_normal_(m.weight, std=0.02)
			nn.init.zeros_(m.bias)
	return mlp


class _TensorGroup:
	"""The same parameter of every expert, so `p.data.fill_(0)` (upstream's `init.zero_`) reaches them all."""

	def __init__(self, tensors):
		self.tensors = tensors

	@property
	def data(self):
		return self

	def fill_(self, value):
		"""Fills every expert's tensor in place; returns self."""
		with torch.no_grad():
			for t in self.tensors:
				t.fill_(value)
		return self


class _LayerGroup:
	"""Layer `idx` of every expert; `weight` / `bias` are `_TensorGroup`s."""

	def __init__(self, layers):
		self.weight = _TensorGroup([layer.weight for layer in layers])
		self.bias = _TensorGroup([layer.bias for layer in layers])


class LeakyMoEBlock(nn.Module):
	"""
	Fork-style MoE block, same constructor as `MoEBlock` plus `fix`. Every forward appends
	`gate.detach().cpu()` ([N, E] float32 dense gate; on CUDA a device-to-host copy and a sync) to
	`gate_history`, and adds the aux loss to the `_aux_loss` buffer; neither is ever reset, under
	`no_grad` too. With `fix=True` (the fork's patch-up): the list is trimmed to 500 rows once it
	passes 1000, `clear_after_update()` clears it and runs `gc.collect()` every 100 updates.
	Experts are separate modules run one after the other, as in the fork. `history_rows` is
	accepted so the constructor is interchangeable with MoEBlock's, and ignored.
	"""

	def __init__(self, in_dim, mlp_dims, out_dim, act=None, dropout=0., *, n_experts=4, top_k=2,
				 temperature=1.0, aux_coef=0.01, zloss_coef=0.0, history_rows=65536, fix=False):
		super().__init__()
		if top_k > n_experts:
			raise ValueError(f"top_k must be <= n_experts={n_experts}, got {top_k}")
		self.in_dim, self.out_dim = in_dim, out_dim
		self.n_experts, self.top_k, self.temperature = n_experts, top_k, temperature
		self.aux_coef, self.zloss_coef, self.fix = aux_coef, zloss_coef, fix
		self.experts = nn.ModuleList([plain_mlp(in_dim, mlp_dims, out_dim, act, dropout) for _ in range(n_experts)])
		self.gate = nn.Linear(in_dim, n_experts)
		nn.init.trunc_normal_(self.gate.weight, std=0.02)
		nn.init.zeros_(self.gate.bias)
		self.gate_history = []
		self.register_buffer("_aux_loss", torch.zeros(()))
		self.aux_loss = None
		self._updates = 0

	def __getitem__(self, idx):
		"""Returns layer `idx` of every expert as one group (so `block[-1].weight` zero-init reaches all)."""
		return _LayerGroup([expert[idx] for expert in self.experts])

	def __len__(self):
		return len(self.experts[0])

	def forward(self, x):
		"""Returns the top-k mixture [..., out_dim]; sets `aux_loss` (with graph) and grows `gate_history`."""
		lead = x.shape[:-1]
		x = x.reshape(-1, self.in_dim)
		logits = self.gate(x)
		probs = F.softmax(logits / self.temperature, dim=-1)
		top, idx = probs.topk(self.top_k, dim=-1)
		top = top / top.sum(-1, keepdim=True)
		gate = torch.zeros_like(probs).scatter(-1, idx, top)
		outs = torch.stack([expert(x) for expert in self.experts], dim=-2)
		out = (gate.unsqueeze(-1) * outs).sum(-2)
		self.gate_history.append(gate.detach().cpu())
		if self.fix and len(self.gate_history) > 1000:
			self.gate_history = self.gate_history[-500:]
		frac = (gate > 0).float().mean(0) / self.top_k
		aux = self.aux_coef * self.n_experts * (frac * probs.mean(0)).sum()
		if self.zloss_coef:
			aux = aux + self.zloss_coef * torch.logsumexp(logits / self.temperature, -1).pow(2).mean()
		self._aux_loss += aux.detach()
		self.aux_loss = aux
		return out.reshape(*lead, self.out_dim)

	def clear_after_update(self):
		"""The per-update hook of the fork's fix: clears `gate_history`, `gc.collect()` every 100 updates. No-op without `fix`."""
		if not self.fix:
			return
		self.gate_history.clear()
		self._updates += 1
		if self._updates % 100 == 0:
			gc.collect()

	def history_bytes(self):
		"""Returns the bytes of tensor data held by `gate_history`."""
		return sum(t.numel() * t.element_size() for t in self.gate_history)
