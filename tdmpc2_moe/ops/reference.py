"""Plain-PyTorch reference of every op: the tests' oracle and the fallback when `_C` is missing."""
from typing import NamedTuple

import torch


class Gate(NamedTuple):
	"""Result of `topk_gate`: weights [N, k], indices [N, k], expert_prob_mean [E], expert_frac [E], lse [N]."""
	weights: torch.Tensor
	indices: torch.Tensor
	expert_prob_mean: torch.Tensor
	expert_frac: torch.Tensor
	lse: torch.Tensor


def _compute(logits):
	"""Returns logits in the compute dtype: float32, or float64 for float64 input (so gradcheck can run)."""
	return logits if logits.dtype == torch.float64 else logits.float()


def topk_gate_reference(logits, k, temperature=1.0, renormalize=True):
	"""
	Top-k softmax gating in plain PyTorch.
	Returns a `Gate` (float32 outputs; float64 for float64 logits); ties between equal probabilities go
	to the lower expert index (a stable descending sort keeps the original order of equal values).
	"""
	x = _compute(logits) / temperature
	n, e = x.shape
	probs = torch.softmax(x, dim=-1)
	top, indices = torch.sort(probs, dim=-1, descending=True, stable=True)
	top, indices = top[:, :k], indices[:, :k]
	weights = top / top.sum(-1, keepdim=True) if renormalize else top
	rows = max(n, 1)
	expert_prob_mean = probs.sum(0) / rows
	counts = torch.zeros(e, dtype=torch.float32, device=x.device)
	counts.index_add_(0, indices.reshape(-1), torch.ones(n * k, dtype=torch.float32, device=x.device))
	expert_frac = counts / (rows * k)
	lse = torch.logsumexp(x, dim=-1)
	return Gate(weights, indices, expert_prob_mean, expert_frac, lse)


def dense_routing(weights, indices, n_experts):
	"""Returns the [N, E] routing matrix: `weights` scattered into their experts' slots, zeros elsewhere."""
	dense = torch.zeros(weights.shape[0], n_experts, dtype=weights.dtype, device=weights.device)
	return dense.scatter(1, indices, weights)


def record_reference(ring, cursor, weights, indices):
	"""
	Writes each row's dense routing vector into `ring` ([capacity, E]) at positions
	`cursor, cursor+1, ...` modulo capacity, then advances `cursor` (an int64 tensor) by N.
	Only tensor ops: no host synchronisation.
	"""
	capacity, e = ring.shape
	n = weights.shape[0]
	dense = dense_routing(weights.float(), indices, e)
	if n > capacity:
		# Only the last `capacity` rows survive a full wrap; writing the others would race.
		dense = dense[n - capacity:]
		start = cursor + (n - capacity)
	else:
		start = cursor
	rows = dense.shape[0]
	pos = torch.remainder(start + torch.arange(rows, device=ring.device), capacity)
	ring.index_copy_(0, pos, dense.to(ring.dtype))
	cursor.add_(n)


def topk_gate_backward_reference(grad_weights, grad_prob_mean, grad_lse, logits, indices, k, temperature, renormalize):
	"""
	Gradient of (weights, expert_prob_mean, lse) of `topk_gate_reference` with respect to `logits`,
	written out by hand (recomputing the softmax), as the compiled backward does it.
	"""
	x = _compute(logits) / temperature
	n = x.shape[0]
	probs = torch.softmax(x, dim=-1)
	top = probs.gather(1, indices)
	if renormalize:
		s = top.sum(-1, keepdim=True)
		w = top / s
		g_top = (grad_weights - (grad_weights * w).sum(-1, keepdim=True)) / s
	else:
		g_top = grad_weights
	g_p = torch.zeros_like(probs).scatter_add(1, indices, g_top) + grad_prob_mean / max(n, 1)
	g_x = probs * (g_p - (g_p * probs).sum(-1, keepdim=True)) + grad_lse.unsqueeze(-1) * probs
	return (g_x / temperature).to(logits.dtype)


# --- Orthonormalisation of expert features (MOORE-style experts, docs/design.md 5a) ---------------------

ORTHONORMALIZE_EPS = 1e-4
"""Default residual-norm floor of `orthonormalize`: well above float32 rounding noise for features of
norm O(1)..O(100) (LayerNorm'd hidden layers), so an exactly dependent vector does not come out as
amplified noise; it bounds the backward's gain by 1 / eps."""


def orthonormalize_reference(features, eps=ORTHONORMALIZE_EPS):
	"""
	Gram-Schmidt (modified, with re-orthogonalisation) of the E vectors `features[:, n, :]` of every row n, in expert
	order, for `features` [E, N, D] (expert-major, as MoEBlock and the fork's parallel layers hold
	them). Returns q [E, N, D] in the input's dtype (computed in float32, float64 stays float64) with
	r_i = x_i minus its projections on q_0..q_{i-1} and q_i = r_i / max(|r_i|, eps).
	Where every |r_i| >= eps the q_i of a row are orthonormal. A vector whose residual is shorter than
	eps (zero, or (near-)parallel to the span of the earlier ones) comes out as r_i / eps: orthogonal to
	the earlier outputs, shorter than 1, the zero vector for an exactly zero residual; values and
	gradients stay finite (the floor is where the norm's gradient is cut).
	"""
	x = _compute(features)
	qs = []
	for i in range(x.shape[0]):
		r = x[i]
		# Two projection passes ("twice is enough"): one leaves rounding-level components along the
		# earlier q when x_i is nearly dependent on them, the second removes those.
		for _ in range(2 if qs else 0):
			for q in qs:
				r = torch.addcmul(r, torch.linalg.vecdot(r, q).unsqueeze(-1), q, value=-1)
		qs.append(r * torch.rsqrt(torch.linalg.vecdot(r, r).unsqueeze(-1).clamp(min=eps * eps)))
	if not qs:
		return features.clone()
	return torch.stack(qs).to(features.dtype)


# --- Routed experts (docs/design.md 22) ------------------------------------------------------------------

EXPERT_ACTIVATIONS = ("none", "mish", "simnorm")
"""What follows each layer's Linear in `routed_experts`: nothing (a plain Linear), LayerNorm then Mish
(TD-MPC2's NormedLinear), or LayerNorm then SimNorm over groups of `simnorm_dim` (its dynamics head)."""


def expert_layer_reference(h, weight, bias, ln_weight, ln_bias, activation, simnorm_dim):
	"""Returns one expert's layer on rows `h` [N, in]: Linear (weight [out, in], bias [out]), then per `activation`."""
	h = torch.nn.functional.linear(h, weight, bias)
	if activation == "none":
		return h
	h = torch.nn.functional.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias)
	if activation == "mish":
		return torch.nn.functional.mish(h)
	return torch.softmax(h.view(*h.shape[:-1], h.shape[-1] // simnorm_dim, simnorm_dim), -1).view(h.shape)


def routed_experts_reference(x, indices, weights, params, activations, simnorm_dim=8):
	"""
	The routed experts in plain PyTorch: every expert's layers (`params` layer after layer: weight
	[E, out, in], bias [E, out], and for a normed layer LayerNorm weight and bias [E, out]) on every row of
	`x` [N, in], then out[r] = sum_j weights[r, j] * expert_{indices[r, j]}(x[r]): [N, out]. Computed in
	x's dtype; differentiable in x, weights and params.
	"""
	n_experts = params[0].shape[0]
	outs = []
	for e in range(n_experts):
		h, p = x, 0
		for activation in activations:
			normed = activation != "none"
			ln_weight, ln_bias = (params[p + 2][e], params[p + 3][e]) if normed else (None, None)
			h = expert_layer_reference(h, params[p][e], params[p + 1][e], ln_weight, ln_bias, activation, simnorm_dim)
			p += 4 if normed else 2
		outs.append(h)
	y = torch.stack(outs)  # [E, N, out]
	rows = torch.arange(x.shape[0], device=x.device)
	w = weights.to(x.dtype)
	return sum(w[:, j:j + 1] * y[indices[:, j], rows] for j in range(indices.shape[1]))
