"""
Measurement baselines, not API: the fork-style MoE block this package replaces (docs/design.md 1),
re-implemented to measure against -- a Python list of host copies of every gate, an aux-loss
accumulator nothing resets, optionally the fork's patch-up fix -- and a plain TD-MPC2-shaped mlp.
Used by `tdmpc2-moe demo`, tests and benchmarks (installed, because `demo` needs them).
`LeakyForkMoEBlock` is the fork's own MOORE-style layer, the baseline of `moe_preset=fork`.
"""
import gc
import math

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


class SimNorm(nn.Module):
	"""Softmax over groups of `dim` features (8 by default): upstream TD-MPC2's SimNorm, the dynamics head's `act`."""

	def __init__(self, dim=8):
		super().__init__()
		self.dim = dim

	def forward(self, x):
		shape = x.shape
		return F.softmax(x.view(*shape[:-1], -1, self.dim), dim=-1).view(*shape)


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


# The fork's own model (seed 000's "MooreTDMPC" MoE layer, docs/design.md 5a), re-implemented the way the
# fork ran it, to measure `moe_preset=fork` against: experts as separate modules run one after the
# other on copies of the input, classical Gram-Schmidt, a dense softmax gate on the input (or the task
# columns) plus the temperature as an extra gate input, a shared NormedLinear head, and the fork's
# costs -- every forward appends the batch's mean gate to a Python list as a host copy (trimmed to
# 500 entries past 1000, the fork's fix), adds the detached KL term to an accumulator buffer (so it
# trains nothing), and on training forwards reads the routing entropy with `.item()` to move a Python
# float temperature. Not API: benchmarks and tests only.
class LeakyForkMoEBlock(nn.Module):
	"""
	Fork-style MOORE MoE block; constructor like MoEBlock's with the fork preset's defaults (dense
	gate over all experts, temperature 1.8, KL coefficient 0.03, orthogonal, shared head, target
	entropy 0.75 ln E). `history_rows` is accepted for interchangeability and ignored. As in the
	fork, the head is a NormedLinear (LayerNorm + `act`, Mish when `act` is None) and the gate has
	no bias. `block[i]` is hidden layer i of every expert (a group) and `block[-1]` the head.
	"""

	def __init__(self, in_dim, mlp_dims, out_dim, act=None, dropout=0., *, n_experts=4, temperature=1.8,
				 aux_coef=0.03, orthogonal=True, gate_dims=None, target_entropy=None, temperature_bounds=(0.5, 2.0),
				 temperature_rate=0.02, temperature_freeze=0, history_rows=None):
		super().__init__()
		mlp_dims = [mlp_dims] if isinstance(mlp_dims, int) else list(mlp_dims)
		self.in_dim, self.out_dim, self.n_experts = in_dim, out_dim, n_experts
		self.tau, self.tau_min, self.tau_max = float(temperature), *map(float, temperature_bounds)
		self.beta, self.lb_alpha, self.orthogonal, self.gate_dims = temperature_rate, aux_coef, orthogonal, gate_dims
		self.h_target = 0.75 * math.log(n_experts) if target_entropy is None else target_entropy
		self.freeze_steps = temperature_freeze
		self.register_buffer("global_step", torch.zeros((), dtype=torch.long))
		dims = [in_dim, *mlp_dims]
		self.experts = nn.ModuleList([
			nn.Sequential(*[NormedLinear(dims[i], dims[i + 1], dropout=dropout * (i == 0)) for i in range(len(mlp_dims))])
			for _ in range(n_experts)])
		self.head = NormedLinear(mlp_dims[-1], out_dim, act=act)
		gate_in = in_dim if gate_dims is None else gate_dims[1] - gate_dims[0]
		self.gate = nn.Linear(gate_in + 1, n_experts, bias=False)   # +1: the temperature as context
		for m in self.modules():
			if isinstance(m, nn.Linear):
				nn.init.trunc_normal_(m.weight, std=0.02)
				if m.bias is not None:
					nn.init.zeros_(m.bias)
		self.gate_history = []
		self.max_history_length = 1000
		self.register_buffer("_aux_loss", torch.zeros(()))
		self._last_entropy = None

	def __getitem__(self, idx):
		"""Returns hidden layer `idx` of every expert as one group, or the shared head for the last index."""
		n = len(self)
		if idx in (-1, n - 1):
			return self.head
		return _LayerGroup([expert[idx] for expert in self.experts])

	def __len__(self):
		return len(self.experts[0]) + 1

	@property
	def aux_loss(self):
		"""The accumulated, detached KL term (the fork added it to its loss after `backward()`)."""
		return self._aux_loss

	def zero_aux_loss(self):
		"""Resets the accumulator (the fork did this after each update)."""
		self._aux_loss.zero_()

	def _gram_schmidt(self, feats):
		"""Classical Gram-Schmidt of each row's E features, `feats` [N, E, D], no guard for zero residuals."""
		basis = (feats[:, 0] / feats[:, 0].norm(dim=-1, keepdim=True)).unsqueeze(1)
		for i in range(1, feats.shape[1]):
			v = feats[:, i:i + 1]
			w = v - torch.matmul(torch.matmul(v, basis.transpose(1, 2)), basis)
			basis = torch.cat([basis, w / w.norm(dim=-1, keepdim=True)], dim=1)
		return basis

	def _update_tau(self, entropy):
		if self.global_step < self.freeze_steps:   # a device tensor compared on the host: a sync
			return
		self.tau += self.beta * math.tanh(self.h_target - entropy.item())
		self.tau = min(max(self.tau, self.tau_min), self.tau_max)

	def forward(self, x):
		"""Returns the dense mixture through the shared head, [..., out_dim]; grows `gate_history`."""
		lead = x.shape[:-1]
		x = x.reshape(-1, self.in_dim)
		# The fork stacked E copies of the input, then each expert's output, by repeated torch.cat.
		x_par = x.unsqueeze(0)
		for _ in range(1, self.n_experts):
			x_par = torch.cat([x_par, x.unsqueeze(0)])
		feats = self.experts[0](x_par[0]).unsqueeze(0)
		for e in range(1, self.n_experts):
			feats = torch.cat([feats, self.experts[e](x_par[e]).unsqueeze(0)])
		feats = feats.transpose(0, 1)
		if self.orthogonal:
			feats = self._gram_schmidt(feats)
		gate_base = x if self.gate_dims is None else x[:, self.gate_dims[0]:self.gate_dims[1]]
		gate_in = torch.cat([gate_base, torch.full_like(x[:, :1], self.tau)], dim=-1)
		w = F.softmax(self.gate(gate_in) / self.tau, dim=-1)
		p_mean = w.mean(0)
		kl = F.kl_div((p_mean + 1e-9).log(), torch.full_like(p_mean, 1.0 / self.n_experts), reduction="sum")
		self._aux_loss += self.lb_alpha * kl.detach()
		self.gate_history.append(w.mean(0, keepdim=True).detach().cpu())
		if len(self.gate_history) > self.max_history_length:
			self.gate_history = self.gate_history[-self.max_history_length // 2:]
		if self.training:
			entropy = (-w * w.clamp_min(1e-9).log()).sum(-1).mean()
			self._last_entropy = entropy.detach()
			self._update_tau(entropy)
			self.global_step += 1
		out = self.head((w.unsqueeze(-1) * feats).sum(1))
		return out.reshape(*lead, self.out_dim)

	def history_bytes(self):
		"""Returns the bytes of tensor data held by `gate_history`."""
		return sum(t.numel() * t.element_size() for t in self.gate_history)
