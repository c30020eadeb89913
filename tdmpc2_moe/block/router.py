"""
Router: how a MoEBlock chooses each row's experts (docs/design.md 5, 5a). A linear gate on the block
input (or on its `gate_dims` columns), the temperature (fixed, or adapted to a target entropy),
`topk_gate`, the gate history, the auxiliary loss and the routing statistics. It hands the block a
`Gate` (weights and indices per row) and knows nothing of what the experts compute.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .history import GateHistory
from ..ops.operators import topk_gate
from .routing_stats import from_sums, topk_statistic_sums
from .temperature import AdaptiveTemperature

KL_EPS = 1e-9
"""Added to the mean expert probabilities before their log (as the fork did): a starved expert
gives a large but finite KL term, and its gradient keeps pushing probability back to it."""


def kl_to_uniform(expert_prob_mean):
	"""Returns KL(uniform || expert_prob_mean) in nats: zero when the gate spreads its probability evenly."""
	e = expert_prob_mean.shape[-1]
	return (math.log(1.0 / e) - torch.log(expert_prob_mean + KL_EPS)).sum(-1) / e


class _AttachAux(torch.autograd.Function):
	"""Returns `out` unchanged; in backward, passes the output gradient through and gives `aux` a gradient of 1."""

	@staticmethod
	def forward(ctx, out, aux):
		return out.view_as(out)

	@staticmethod
	def backward(ctx, grad_out):
		return grad_out, torch.ones((), dtype=grad_out.dtype, device=grad_out.device)


class Router(nn.Module):
	"""
	The routing half of a MoEBlock with `options` (settings.BlockOptions) for inputs of width `in_dim`.
	`gate` is the linear gate; `adaptive_temperature` the temperature when `target_entropy` is set
	(else None: the fixed `temperature`); `history` the gate's GateHistory (None when `history_rows`
	is None or 0). Without a history, the sums behind the latest batch's routing statistics are kept
	instead (routing_stats.py), in fixed buffers overwritten in place (no host sync).
	"""

	def __init__(self, in_dim, options):
		super().__init__()
		self.in_dim, self.options = in_dim, options
		if options.gate_dims is not None and options.gate_dims[1] > in_dim:
			raise ValueError(f"gate_dims must be None or (start, stop) with 0 <= start < stop <= in_dim={in_dim}, "
							 f"got {options.gate_dims!r}")
		start, stop = options.gate_dims or (0, in_dim)
		self.gate = nn.Linear(stop - start, options.n_experts)
		nn.init.trunc_normal_(self.gate.weight, std=0.02)
		nn.init.zeros_(self.gate.bias)
		self.adaptive_temperature = None
		if options.target_entropy is not None:
			self.adaptive_temperature = AdaptiveTemperature(
				options.temperature, options.target_entropy, options.temperature_bounds, options.temperature_rate,
				options.temperature_freeze)
		self.history = GateHistory(options.history_rows, options.n_experts) if options.history_rows else None
		e = options.n_experts
		self.register_buffer("_last_aux", torch.zeros(()), persistent=False)
		self.register_buffer("_last_slots", torch.zeros(e), persistent=False)
		self.register_buffer("_last_weight", torch.zeros(e), persistent=False)
		self.register_buffer("_last_entropy", torch.zeros(()), persistent=False)
		self.register_buffer("_last_rows", torch.zeros((), dtype=torch.int64), persistent=False)

	def route(self, x, history=None):
		"""
		Returns the `Gate` of the rows of `x` [..., in_dim] (flattened to N rows): the gate reads the
		`gate_dims` columns, at the current temperature. With `history` the rows are recorded there too.
		"""
		o = self.options
		x = x.reshape(-1, self.in_dim)
		x = x if o.gate_dims is None else x[:, o.gate_dims[0]:o.gate_dims[1]]
		if o.gate_offset:
			# logits = W x / tau + b: the temperature scales the weights' part only.
			logits = F.linear(x, self.gate.weight)
			logits = logits / o.temperature if self.adaptive_temperature is None else self.adaptive_temperature.scale(logits)
			return topk_gate(logits + self.gate.bias, o.top_k, history=history)
		logits = self.gate(x)
		if self.adaptive_temperature is None:
			return topk_gate(logits, o.top_k, temperature=o.temperature, history=history)
		return topk_gate(self.adaptive_temperature.scale(logits), o.top_k, history=history)

	def forward(self, x):
		"""
		Returns the `Gate` of the rows `x` [N, in_dim], recorded in the history. A training forward
		(train mode, grad enabled) also moves the adaptive temperature.
		"""
		gate = self.route(x, self.history)
		if self.adaptive_temperature is not None and self.training and torch.is_grad_enabled() and x.shape[0]:
			self.adaptive_temperature.step(gate.weights)
		return gate

	def aux_loss(self, gate):
		"""
		Returns the auxiliary loss of a `Gate`: Switch load balancing (or, with balance="kl",
		aux_coef * KL(uniform || expert_prob_mean)) plus the router z-loss.
		"""
		o = self.options
		if o.balance == "kl":
			aux = o.aux_coef * kl_to_uniform(gate.expert_prob_mean)
		else:
			aux = o.aux_coef * o.n_experts * (gate.expert_frac * gate.expert_prob_mean).sum()
		if o.zloss_coef:
			aux = aux + o.zloss_coef * gate.lse.pow(2).mean()
		return aux

	def with_aux_loss(self, out, gate):
		"""
		Returns `out` (the block output of the rows `gate` routed) with the aux loss on its autograd
		graph: whatever loss is backpropagated through it also trains the gate towards balance, and
		nothing accumulates. Records the loss (and, without history, the batch's statistics).
		"""
		aux = self.aux_loss(gate)
		with torch.no_grad():
			self._last_aux.copy_(aux)
			if self.history is None:
				self._record_latest(gate)
		if (self.options.aux_coef or self.options.zloss_coef) and torch.is_grad_enabled() and aux.requires_grad:
			out = _AttachAux.apply(out, aux)
		return out

	def _record_latest(self, gate):
		for name, value in topk_statistic_sums(gate.weights, gate.indices, self.options.n_experts).items():
			getattr(self, f"_last_{name}").copy_(value)
		self._last_rows.fill_(gate.weights.shape[0])

	@property
	def temperature(self):
		"""Returns the current temperature as a device tensor [] (the adapted one when it adapts)."""
		if self.adaptive_temperature is not None:
			return self.adaptive_temperature.tau
		return self._last_aux.new_full((), self.options.temperature)

	def stats(self):
		"""
		Returns routing statistics as device tensors (no host sync): `usage`, `mean_weight`, `entropy`,
		`max_load`, `rows` (routing_stats.py) over the gate history (over the latest batch when there is
		none), `aux_loss` [] of the latest forward and the current `temperature` [].
		"""
		if self.history is not None:
			out = self.history.stats()
		else:
			sums = {"slots": self._last_slots, "weight": self._last_weight, "entropy": self._last_entropy}
			out = from_sums(sums, self._last_rows)
		out["aux_loss"] = self._last_aux
		out["temperature"] = self.temperature
		return out
