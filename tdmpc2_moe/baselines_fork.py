"""
The fork's own model (seed 000's "MooreTDMPC" MoE layer, DESIGN.md 5a), re-implemented the way the
fork ran it, to measure `moe_preset=fork` against: experts as separate modules run one after the
other on copies of the input, classical Gram-Schmidt, a dense softmax gate on the input (or the task
columns) plus the temperature as an extra gate input, a shared NormedLinear head, and the fork's
costs -- every forward appends the batch's mean gate to a Python list as a host copy (trimmed to
500 entries past 1000, the fork's fix), adds the detached KL term to an accumulator buffer (so it
trains nothing), and on training forwards reads the routing entropy with `.item()` to move a Python
float temperature. Not API: benchmarks and tests only.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .leaky import NormedLinear, _LayerGroup


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
