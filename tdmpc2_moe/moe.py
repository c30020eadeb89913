"""MoEBlock: a Mixture-of-Experts drop-in for TD-MPC2's `layers.mlp`, experts stored batched."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import DISPATCHES, check_int, check_number
from .dispatch import choose, group_by_expert, run_expert, run_grouped, run_padded, static_path
from .experts import ExpertLinear
from .history import GateHistory, routing_entropy
from .moe_options import AdaptiveTemperature, SharedLinear, check_options, kl_to_uniform
from .ops import orthonormalize, topk_gate


class _AttachAux(torch.autograd.Function):
	"""Returns `out` unchanged; in backward, passes the output gradient through and gives `aux` a gradient of 1."""

	@staticmethod
	def forward(ctx, out, aux):
		return out.view_as(out)

	@staticmethod
	def backward(ctx, grad_out):
		return grad_out, torch.ones((), dtype=grad_out.dtype, device=grad_out.device)


class MoEBlock(nn.Module):
	"""
	Mixture-of-Experts drop-in for TD-MPC2's `layers.mlp(in_dim, mlp_dims, out_dim, act, dropout)`.
	E experts with upstream's layer structure (NormedLinear hidden layers with dropout on the first,
	a plain last Linear or a NormedLinear with `act`), a linear gate on the block input, `topk_gate`,
	and the top-k weighted sum of the expert outputs.
	`dispatch` (docs/design.md 5b): "dense" computes every expert on every row and combines with a dense
	[N, E] routing matrix (static shapes: CUDA graphs, torch.compile); "sparse" runs only each row's
	top-k experts, grouped per expert (dispatch.py: exact groups on the CPU in eager mode, padded
	static shapes on CUDA and under torch.compile), same values and gradients; "auto" (default) picks
	by device and shape (`dispatch.choose`). Sparse is refused with `orthogonal=True` (every row needs
	all E expert features); an empty batch always runs dense.
	The load-balancing (+ z) loss rides on the output's autograd graph: whatever loss is
	backpropagated through the output also trains the gate towards balance; nothing accumulates.
	`history_rows=None` turns gate recording off.
	`batched` picks how the experts run: one batched matmul per layer (True), or per expert on views
	of the same stacked weights (False; on CPU, BLAS GEMMs with a fused LayerNorm measured faster than
	bmm with a separate per-expert affine). None (default): batched except on CPU.

	The fork's model (docs/design.md 5a; helpers in moe_options.py), keyword-only, off by default:
	`balance="kl"` balances with `aux_coef * KL(uniform || expert_prob_mean)` instead of the Switch
	term; `shared_head=True` makes the experts the hidden layers only and runs one shared last layer
	after the mix; `orthogonal=True` orthonormalises each row's E mixed feature vectors (Gram-Schmidt
	in expert order, `ops.orthonormalize`); `gate_dims=(start, stop)` makes the gate read only those
	input columns; `target_entropy` (nats) adapts the temperature, starting at `temperature`, after
	each training forward (see `AdaptiveTemperature`; `temperature_bounds`, `temperature_rate`,
	`temperature_freeze`). `top_k=n_experts` is the dense softmax gate. Two more reproduce the fork's
	network exactly: `last_norm=True` makes the last layer a NormedLinear (LayerNorm, then `act` or
	Mish) even without `act` (the fork's reward head); `gate_offset=True` adds the gate's bias after the
	division by the temperature, logits = W x / tau + b (what the fork's temperature column of its
	bias-free gate amounts to), instead of (W x + b) / tau.
	"""

	def __init__(self, in_dim, mlp_dims, out_dim, act=None, dropout=0., *, n_experts=4, top_k=2,
				 temperature=1.0, aux_coef=0.01, zloss_coef=0.0, history_rows=65536, balance="switch",
				 shared_head=False, orthogonal=False, gate_dims=None, target_entropy=None,
				 temperature_bounds=(0.5, 2.0), temperature_rate=0.02, temperature_freeze=0, dispatch="auto",
				 last_norm=False, gate_offset=False, expert_dim=None):
		super().__init__()
		mlp_dims = [mlp_dims] if isinstance(mlp_dims, int) else list(mlp_dims)
		if expert_dim is not None:
			# Every expert's hidden layers get their own width (with shared_head, the mixed features').
			check_int("expert_dim", expert_dim, 1)
			mlp_dims = [expert_dim] * len(mlp_dims)
		self.expert_dim = expert_dim
		for i, d in enumerate([in_dim, *mlp_dims, out_dim]):
			check_int("in_dim" if i == 0 else "out_dim" if i == len(mlp_dims) + 1 else "mlp_dims", d, 1)
		check_int("n_experts", n_experts, 1, 1024)
		check_int("top_k", top_k, 1, n_experts)
		check_number("dropout", dropout, positive=False)
		if history_rows is not None:
			check_int("history_rows", history_rows, 1)
		self.in_dim, self.out_dim = in_dim, out_dim
		self.n_experts, self.top_k = n_experts, top_k
		self.temperature = check_number("temperature", temperature, positive=True)
		self.aux_coef = check_number("aux_coef", aux_coef, positive=False)
		self.zloss_coef = check_number("zloss_coef", zloss_coef, positive=False)
		options = check_options(
			in_dim=in_dim, mlp_dims=mlp_dims, out_dim=out_dim, n_experts=n_experts, top_k=top_k,
			temperature=self.temperature, balance=balance, shared_head=shared_head, orthogonal=orthogonal,
			gate_dims=gate_dims, target_entropy=target_entropy, temperature_bounds=temperature_bounds,
			temperature_rate=temperature_rate, temperature_freeze=temperature_freeze, last_norm=last_norm,
			gate_offset=gate_offset)
		self.last_norm, self.gate_offset = options["last_norm"], options["gate_offset"]
		self.balance, self.shared_head = options["balance"], options["shared_head"]
		if dispatch not in DISPATCHES:
			raise ValueError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
		if dispatch == "sparse" and options["orthogonal"]:
			raise ValueError("dispatch='sparse' cannot run with orthogonal=True: each row's E expert features are "
							 "orthonormalised together, so every expert runs on every row; use 'dense' or 'auto'")
		self.dispatch = dispatch
		self.orthogonal, self.gate_dims = options["orthogonal"], options["gate_dims"]
		dims = [in_dim, *mlp_dims, out_dim]
		layers = [ExpertLinear(n_experts, dims[i], dims[i + 1], norm=True, dropout=dropout * (i == 0))
				  for i in range(len(dims) - 2)]
		last_is_normed = act is not None or self.last_norm
		if shared_head:
			layers.append(SharedLinear(dims[-2], dims[-1], norm=last_is_normed, act=act))
		else:
			layers.append(ExpertLinear(n_experts, dims[-2], dims[-1], norm=last_is_normed, act=act))
		self.layers = nn.ModuleList(layers)
		gate_in = in_dim if self.gate_dims is None else self.gate_dims[1] - self.gate_dims[0]
		self.gate = nn.Linear(gate_in, n_experts)
		nn.init.trunc_normal_(self.gate.weight, std=0.02)
		nn.init.zeros_(self.gate.bias)
		self.history = GateHistory(history_rows, n_experts) if history_rows is not None else None
		self.adaptive_temperature = None
		if target_entropy is not None:
			self.adaptive_temperature = AdaptiveTemperature(
				self.temperature, options["target_entropy"], options["temperature_bounds"],
				options["temperature_rate"], temperature_freeze)
		self.batched = None
		# Last forward's aux loss and routing summary, overwritten in place (fixed storage, no host sync).
		self.register_buffer("_last_aux", torch.zeros(()), persistent=False)
		self.register_buffer("_last_usage", torch.zeros(n_experts), persistent=False)
		self.register_buffer("_last_mean_weight", torch.zeros(n_experts), persistent=False)
		self.register_buffer("_last_entropy", torch.zeros(()), persistent=False)

	def __getitem__(self, idx):
		"""
		Returns layer `idx` (an ExpertLinear); `block[-1].weight` is every expert's last-layer weight
		[E, out, in], or with `shared_head` the shared last layer's (a SharedLinear) weight [out, in].
		"""
		return self.layers[idx]

	def __len__(self):
		return len(self.layers)

	@property
	def last_aux_loss(self):
		"""Returns the aux loss of the latest forward (detached scalar tensor on the block's device)."""
		return self._last_aux

	@property
	def expert_layers(self):
		"""Returns the layers each expert has its own of: all of them, or the hidden ones with `shared_head`."""
		return self.layers[:-1] if self.shared_head else self.layers

	def _is_batched(self, x):
		return self.batched if self.batched is not None else x.device.type != "cpu"

	def _expert(self, x, e, views=None):
		return run_expert(self.expert_layers, views or [layer.expert_views() for layer in self.expert_layers], x, e)

	def experts(self, x):
		"""
		Returns every expert's output for `x` [N, in_dim], stacked [E, N, out_dim] (with `shared_head`,
		the experts' last hidden features [E, N, mlp_dims[-1]], which the shared layer reads once mixed).
		"""
		if not self._is_batched(x):
			views = [layer.expert_views() for layer in self.expert_layers]
			return torch.stack([self._expert(x, e, views) for e in range(self.n_experts)])
		for layer in self.expert_layers:
			x = layer(x)
		return x

	def route(self, x, history=None):
		"""
		Returns the `Gate` of the rows of `x` [..., in_dim] (flattened to N rows) as the block routes
		them: the gate reads the `gate_dims` columns, at the current temperature (the adaptive one when
		`target_entropy` is set). With `history` (a GateHistory) the routing is recorded there too.
		"""
		x = x.reshape(-1, self.in_dim)
		x = x if self.gate_dims is None else x[:, self.gate_dims[0]:self.gate_dims[1]]
		if self.gate_offset:
			# logits = W x / tau + b: the temperature scales the weights' part only.
			logits = F.linear(x, self.gate.weight)
			if self.adaptive_temperature is None:
				logits = logits / self.temperature
			else:
				logits = self.adaptive_temperature.scale(logits)
			return topk_gate(logits + self.gate.bias, self.top_k, history=history)
		logits = self.gate(x)
		if self.adaptive_temperature is None:
			return topk_gate(logits, self.top_k, temperature=self.temperature, history=history)
		return topk_gate(self.adaptive_temperature.scale(logits), self.top_k, history=history)

	def aux_loss(self, gate):
		"""
		Returns the block's auxiliary loss for a `Gate`: Switch load balancing (or, with balance="kl",
		aux_coef * KL(uniform || expert_prob_mean)) plus the router z-loss.
		"""
		if self.balance == "kl":
			aux = self.aux_coef * kl_to_uniform(gate.expert_prob_mean)
		else:
			aux = self.aux_coef * self.n_experts * (gate.expert_frac * gate.expert_prob_mean).sum()
		if self.zloss_coef:
			aux = aux + self.zloss_coef * gate.lse.pow(2).mean()
		return aux

	def forward(self, x):
		"""
		Returns the top-k mixture of expert outputs (with `orthogonal`, of their orthonormalised
		features; with `shared_head`, passed through the shared last layer), [..., out_dim] for `x`
		[..., in_dim]. A training forward (train mode, grad enabled) also steps the adaptive temperature.
		"""
		if x.shape[-1] != self.in_dim:
			raise ValueError(f"x must have last dimension in_dim={self.in_dim}, got shape {tuple(x.shape)}")
		lead = x.shape[:-1]
		x = x.reshape(-1, self.in_dim)
		gate = self.route(x, self.history)
		if self.dispatch_for(x) == "sparse" and x.shape[0]:
			grouping = group_by_expert(gate.indices, gate.weights, self.n_experts)
			if static_path(x.device.type):
				out = run_padded(self.expert_layers, x, grouping, self.n_experts)
			else:
				out = run_grouped(self.expert_layers, x, grouping)
		else:
			out = self._dense(x, gate)
		if self.shared_head:
			out = self.layers[-1](out)
		if self.adaptive_temperature is not None and self.training and torch.is_grad_enabled() and x.shape[0]:
			self.adaptive_temperature.step(gate.weights)
		aux = self.aux_loss(gate)
		with torch.no_grad():
			self._last_aux.copy_(aux)
			if self.history is None:
				self._record_last(gate)
		if (self.aux_coef or self.zloss_coef) and torch.is_grad_enabled() and aux.requires_grad:
			out = _AttachAux.apply(out, aux)
		return out.reshape(*lead, self.out_dim)

	def dispatch_for(self, x):
		"""Returns "dense" or "sparse": how the block runs the rows `x` [N, in_dim] (`dispatch.choose`)."""
		return choose(self.dispatch, static=static_path(x.device.type), grad=torch.is_grad_enabled(), rows=x.shape[0],
					  n_experts=self.n_experts, top_k=self.top_k, orthogonal=self.orthogonal)

	def _dense(self, x, gate):
		# Every expert on every row, combined through the dense [N, E] routing matrix.
		dtype = self.layers[-1].weight.dtype
		routing = torch.zeros(x.shape[0], self.n_experts, dtype=dtype, device=x.device)
		routing = routing.scatter(1, gate.indices, gate.weights.to(dtype))
		if self._is_batched(x) or self.orthogonal:
			features = self.experts(x)
			if self.orthogonal:
				features = orthonormalize(features)
			return (routing.t().unsqueeze(-1) * features).sum(0)
		views = [layer.expert_views() for layer in self.expert_layers]
		out = routing[:, :1] * self._expert(x, 0, views)
		for e in range(1, self.n_experts):
			out = torch.addcmul(out, routing[:, e:e + 1], self._expert(x, e, views))
		return out

	def _record_last(self, gate):
		n = max(gate.weights.shape[0], 1)
		w = gate.weights.to(self._last_mean_weight.dtype)
		self._last_usage.copy_(gate.expert_frac)
		self._last_mean_weight.zero_().index_add_(0, gate.indices.reshape(-1), w.reshape(-1)).div_(n)
		self._last_entropy.copy_(routing_entropy(w, n))

	def stats(self):
		"""
		Returns routing statistics as device tensors (no host sync): `usage` [E], `mean_weight` [E],
		`entropy` [], `max_load` [] over the gate history (over the latest batch when history is off),
		`aux_loss` [] of the latest forward and the gate's current `temperature` [].
		"""
		if self.history is not None:
			out = self.history.stats()
		else:
			out = {"usage": self._last_usage, "mean_weight": self._last_mean_weight,
				   "entropy": self._last_entropy, "max_load": self._last_usage.max()}
		out["aux_loss"] = self._last_aux
		if self.adaptive_temperature is not None:
			out["temperature"] = self.adaptive_temperature.tau
		else:
			out["temperature"] = self._last_aux.new_full((), self.temperature)
		return out

	def extra_repr(self):
		rows = self.history.capacity if self.history is not None else None
		options = "".join(f", {name}={getattr(self, name)!r}" for name, default in
						  [("balance", "switch"), ("shared_head", False), ("orthogonal", False), ("gate_dims", None),
						   ("dispatch", "auto"), ("last_norm", False), ("gate_offset", False), ("expert_dim", None)]
						  if getattr(self, name) != default)
		return f"n_experts={self.n_experts}, top_k={self.top_k}, temperature={self.temperature}, " \
			f"aux_coef={self.aux_coef}, zloss_coef={self.zloss_coef}, history_rows={rows}{options}"
