"""
The parts of MoEBlock behind its fork options (docs/design.md 5a; the model of the TD-MPC2 fork users come
from, with MOORE-style orthogonal experts): argument checks, the shared last layer, the KL-to-uniform
balance term and the adaptive temperature. MoEBlock (moe.py) wires them in; with its defaults none of
them is built and the block is the plain top-k MoE of docs/design.md 5.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_int, check_number
from .history import routing_entropy

BALANCES = ("switch", "kl")
KL_EPS = 1e-9
"""Added to the mean expert probabilities before their log (as the fork did): a starved expert
gives a large but finite KL term, and its gradient keeps pushing probability back to it."""


def _is_pair(value):
	# Any sequence (tuple, list, OmegaConf's ListConfig from a YAML config) of two items, not a string.
	return isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2


def _check_bool(name, value):
	if not isinstance(value, bool):
		raise ValueError(f"{name} must be True or False, got {value!r}")
	return value


def check_options(*, in_dim, mlp_dims, out_dim, n_experts, top_k, temperature, balance, shared_head,
				  orthogonal, gate_dims, target_entropy, temperature_bounds, temperature_rate, temperature_freeze,
				  last_norm=False, gate_offset=False):
	"""
	Checks MoEBlock's fork options against each other and the block's shape; returns them normalised
	(gate_dims and temperature_bounds as tuples, numbers as float). Raises ValueError naming the argument.
	"""
	if balance not in BALANCES:
		raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
	_check_bool("shared_head", shared_head)
	_check_bool("orthogonal", orthogonal)
	_check_bool("last_norm", last_norm)
	_check_bool("gate_offset", gate_offset)
	if shared_head and not mlp_dims:
		raise ValueError("shared_head=True needs at least one hidden layer (mlp_dims is empty): the experts "
						 "are the hidden layers and the last layer is shared")
	if orthogonal:
		width, what = (mlp_dims[-1], "mlp_dims[-1]") if shared_head else (out_dim, "out_dim")
		if n_experts > width:
			raise ValueError(f"orthogonal=True needs n_experts <= the width of the mixed features ({what}={width}), "
							 f"got n_experts={n_experts}: at most {width} vectors of width {width} can be orthonormal")
	if gate_dims is not None:
		if not _is_pair(gate_dims) \
				or not all(isinstance(v, int) and not isinstance(v, bool) for v in gate_dims) \
				or not 0 <= gate_dims[0] < gate_dims[1] <= in_dim:
			raise ValueError(f"gate_dims must be None or (start, stop) with 0 <= start < stop <= in_dim={in_dim}, "
							 f"got {gate_dims!r}")
		gate_dims = tuple(gate_dims)
	if not _is_pair(temperature_bounds):
		raise ValueError(f"temperature_bounds must be (low, high), got {temperature_bounds!r}")
	low = check_number("temperature_bounds", temperature_bounds[0], positive=True)
	high = check_number("temperature_bounds", temperature_bounds[1], positive=True)
	if low > high:
		raise ValueError(f"temperature_bounds must have low <= high, got {temperature_bounds!r}")
	temperature_rate = check_number("temperature_rate", temperature_rate, positive=True)
	check_int("temperature_freeze", temperature_freeze, 0)
	if target_entropy is not None:
		target_entropy = check_number("target_entropy", target_entropy, positive=False)
		if target_entropy > math.log(top_k) + 1e-9:
			raise ValueError(f"target_entropy={target_entropy} nats is out of reach: the routing weights of "
							 f"top_k={top_k} experts have an entropy of at most ln({top_k})={math.log(top_k):.4f}")
		if not low <= temperature <= high:
			raise ValueError(f"temperature={temperature} (the adaptive temperature's start) must lie within "
							 f"temperature_bounds=({low}, {high})")
	return dict(balance=balance, shared_head=shared_head, orthogonal=orthogonal, gate_dims=gate_dims,
				target_entropy=target_entropy, temperature_bounds=(low, high), temperature_rate=temperature_rate,
				temperature_freeze=temperature_freeze, last_norm=last_norm, gate_offset=gate_offset)


def kl_to_uniform(expert_prob_mean):
	"""Returns KL(uniform || expert_prob_mean) in nats: zero when the gate spreads its probability evenly."""
	e = expert_prob_mean.shape[-1]
	return (math.log(1.0 / e) - torch.log(expert_prob_mean + KL_EPS)).sum(-1) / e


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


class AdaptiveTemperature(nn.Module):
	"""
	The gate temperature tau of a MoEBlock with a target entropy, kept on the device: after each training
	forward `step()` sets tau = clamp(tau + rate * tanh(target - H), low, high), H the batch's mean
	routing entropy, except during the first `freeze` training forwards. Both buffers (`tau` and the
	count of training forwards, `forwards`) are persistent: a checkpoint restores the temperature and
	where the freeze stands. Only tensor ops: no host sync, traceable by torch.compile.
	"""

	def __init__(self, start, target, bounds, rate, freeze):
		super().__init__()
		self.target, self.bounds, self.rate, self.freeze = target, bounds, rate, freeze
		self.register_buffer("tau", torch.tensor(float(start)))
		self.register_buffer("forwards", torch.zeros((), dtype=torch.int64))

	def scale(self, logits):
		"""
		Returns `logits / tau`. topk_gate then runs at temperature 1.0, so the gate sees the same
		softmax(logits / tau) without reading tau on the host; the division is part of the graph and
		the gradient reaches the logits scaled by 1 / tau, as through topk_gate's own temperature.
		"""
		return logits / self.tau.to(logits.dtype)

	@torch.no_grad()
	def step(self, weights):
		"""
		Moves tau towards the target entropy from the routing `weights` [N, k] of a training forward.
		The new tau is a new tensor bound to the buffer's name, not written into the old one: the
		backward of this forward still needs the tau it divided by, and compiled graphs (AOTAutograd)
		save that buffer itself for backward, so an in-place write would hand backward the new value.
		"""
		entropy = routing_entropy(weights.to(self.tau.dtype), max(weights.shape[0], 1))
		move = self.rate * torch.tanh(self.target - entropy)
		move = torch.where(self.forwards >= self.freeze, move, torch.zeros_like(move))
		self.tau = torch.clamp(self.tau + move, *self.bounds)
		self.forwards.add_(1)

	def extra_repr(self):
		return f"target={self.target}, bounds={self.bounds}, rate={self.rate}, freeze={self.freeze}"
