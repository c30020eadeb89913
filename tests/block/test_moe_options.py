"""
MoEBlock's fork options (docs/design.md 5a): each against a plain-PyTorch model of the fork's computation
written here from the block's parameters (values and gradients), the KL balance term training the gate,
the adaptive temperature (direction, bounds, freeze, train-only, checkpoints, torch.compile), defaults.
"""
import copy
import gc
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import assert_compiled_matches_eager
from tdmpc2_moe.block.baselines import LeakyForkMoEBlock, SimNorm
from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.ops.operators import orthonormalize

IN, HIDDEN, OUT = 12, [32, 24], 16


def gram_schmidt(f):
	"""Orthonormal basis of each row's expert vectors f [N, E, D] in expert order, via QR with R's diagonal made positive."""
	q, r = torch.linalg.qr(f.transpose(1, 2))
	return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)).transpose(1, 2)


def plain_fork_model(block, x, tau, *, act=None, balance="switch", shared_head=False, orthogonal=False,
					 gate_dims=None, last_norm=False, gate_offset=False):
	"""
	The fork's MoE written row-major from the block's parameters: softmax(gate(x[gate columns]) / tau)
	(with `gate_offset`, softmax(W x / tau + b)),
	top-k renormalised, experts one by one, Gram-Schmidt of the E features per row, weighted sum, then
	the shared layer. Returns (out, aux, routing weights [N, E], mean routing entropy).
	"""
	e_n = block.n_experts
	g_in = x if gate_dims is None else x[:, gate_dims[0]:gate_dims[1]]
	if gate_offset:
		logits = F.linear(g_in, block.gate.weight) / tau + block.gate.bias
	else:
		logits = F.linear(g_in, block.gate.weight, block.gate.bias) / tau
	probs = torch.softmax(logits.float(), -1)
	top, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
	top, idx = top[:, :block.top_k], idx[:, :block.top_k]
	w = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True)).to(x.dtype)
	n_expert_layers = len(block) - 1 if shared_head else len(block)
	feats = []
	for e in range(e_n):
		h = x
		for i in range(n_expert_layers):
			layer = block[i]
			h = F.linear(h, layer.weight[e], layer.bias[e])
			if layer.norm:
				h = F.layer_norm(h, (layer.out_features,)) * layer.ln_weight[e] + layer.ln_bias[e]
				h = (act if i == len(block) - 1 and act is not None else F.mish)(h)
		feats.append(h)
	f = torch.stack(feats, 1)
	if orthogonal:
		f = gram_schmidt(f)
	out = (w.unsqueeze(-1) * f).sum(1)
	if shared_head:
		head = block[-1]
		out = F.linear(out, head.weight, head.bias)
		if act is not None or last_norm:
			out = (act or F.mish)(F.layer_norm(out, (head.out_features,)) * head.ln_weight + head.ln_bias)
	p_mean = probs.mean(0)
	if balance == "kl":
		aux = block.options.aux_coef * F.kl_div(torch.log(p_mean + 1e-9), torch.full_like(p_mean, 1 / e_n), reduction="sum")
	else:
		frac = torch.zeros(e_n).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / idx.numel()
		aux = block.options.aux_coef * e_n * (frac * p_mean).sum()
	entropy = -(w * torch.log(w.clamp(min=1e-12))).sum(-1).mean()
	return out, aux, w, entropy


CASES = {
	"kl": dict(balance="kl"),
	"shared_head": dict(shared_head=True),
	"shared_head_simnorm": dict(shared_head=True, act=SimNorm()),
	"orthogonal": dict(orthogonal=True),
	"orthogonal_shared_simnorm": dict(orthogonal=True, shared_head=True, act=SimNorm()),
	"gate_dims": dict(gate_dims=(4, 10)),
	"dense": dict(top_k=4),
	"fork": dict(top_k=4, balance="kl", shared_head=True, orthogonal=True, gate_dims=(8, 12), act=SimNorm(),
				 temperature=1.8, target_entropy=0.75 * math.log(4)),
	"last_norm": dict(last_norm=True),
	"last_norm_shared_head": dict(last_norm=True, shared_head=True),
	"gate_offset": dict(gate_offset=True, temperature=1.7),
	"fork_dynamics": dict(top_k=4, balance="kl", shared_head=True, orthogonal=True, act=SimNorm(), last_norm=True,
						  gate_offset=True, temperature=1.8, target_entropy=0.75 * math.log(4)),
	"fork_reward": dict(top_k=4, balance="kl", shared_head=True, orthogonal=True, gate_dims=(8, 12), last_norm=True,
						gate_offset=True, temperature=1.8, target_entropy=0.75 * math.log(4)),
}


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per_expert"])
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients_match_plain_fork_model_in_float64(case, batched):
	opts = dict(CASES[case])
	act = opts.pop("act", None)
	top_k = opts.pop("top_k", 2)
	torch.manual_seed(0)
	block = MoEBlock(IN, HIDDEN, OUT, act=act, n_experts=4, top_k=top_k, aux_coef=0.5,
					 history_rows=None, **opts).double()
	block.experts.batched = batched
	nn.init.normal_(block.gate.weight, std=1.0)
	x = torch.randn(40, IN, dtype=torch.float64, requires_grad=True)
	target = torch.randn(40, OUT, dtype=torch.float64)
	tau = opts.get("temperature", 1.0)
	out = block(x)
	((out - target) ** 2).sum().backward()
	names = [n for n, _ in block.named_parameters()] + ["x"]
	grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
	aux_block = block.last_aux_loss.clone()
	block.zero_grad()
	x.grad = None
	kw = {k: v for k, v in opts.items()
		  if k in ("balance", "shared_head", "orthogonal", "gate_dims", "last_norm", "gate_offset")}
	ref, aux, _, _ = plain_fork_model(block, x, tau, act=act, **kw)
	(((ref - target) ** 2).sum() + aux).backward()
	torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
	torch.testing.assert_close(aux_block, aux.detach().to(aux_block.dtype), rtol=1e-5, atol=1e-7)
	# The gate computes in float32 (the compiled op casts float64 logits): its rounding reaches every
	# gradient, so the absolute tolerance scales with the gradient (the orthogonal layers' reach ~1e2).
	for name, g, p in zip(names, grads, list(block.parameters()) + [x]):
		atol = 1e-6 * max(1.0, p.grad.abs().max().item())
		torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def test_gate_offset_is_not_divided_by_the_adapted_temperature():
	# The fork's gate: logits = W x / tau + b at whatever tau has adapted to, not (W x + b) / tau.
	torch.manual_seed(0)
	block = MoEBlock(IN, HIDDEN, OUT, n_experts=4, top_k=4, temperature=1.8, target_entropy=0.1,
					 gate_offset=True, history_rows=None)
	nn.init.normal_(block.gate.weight)
	nn.init.normal_(block.gate.bias)
	block.train()
	for _ in range(5):
		block(torch.randn(16, IN))
	tau = block.router.adaptive_temperature.tau
	assert float(tau) < 1.8 - 0.05
	x = torch.randn(8, IN)
	expected = torch.softmax(F.linear(x, block.gate.weight) / tau + block.gate.bias, -1)
	gate = block.route(x)
	routed = torch.zeros(8, 4).scatter(1, gate.indices, gate.weights)
	torch.testing.assert_close(routed, expected)


def test_orthogonal_block_mixes_orthonormal_features():
	torch.manual_seed(0)
	block = MoEBlock(IN, HIDDEN, OUT, n_experts=4, top_k=4, orthogonal=True, shared_head=True)
	x = torch.randn(64, IN)
	seen = {}
	block.layers[-1].register_forward_pre_hook(lambda m, args: seen.update(mixed=args[0]))
	feats = block.experts.features(x)
	q = orthonormalize(feats)
	torch.testing.assert_close(torch.einsum("end,fnd->nef", q, q), torch.eye(4).expand(64, 4, 4), atol=1e-5, rtol=0)
	block(x)
	weights = block.route(x).weights
	# The shared layer reads the weighted sum of orthonormal vectors: its norm is the weights' 2-norm.
	torch.testing.assert_close(seen["mixed"].norm(dim=-1), weights.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_orthogonal_block_has_finite_gradients_for_dead_experts():
	torch.manual_seed(0)
	block = MoEBlock(IN, [16], 8, n_experts=4, top_k=4, orthogonal=True)
	with torch.no_grad():
		block[0].ln_weight[1].zero_()        # expert 1's features are all zero
		block[0].ln_bias[1].zero_()
		block[-1].weight[3].copy_(block[-1].weight[0])   # expert 3 is a copy of expert 0
		block[-1].bias[3].copy_(block[-1].bias[0])
	x = torch.randn(32, IN, requires_grad=True)
	out = block(x)
	(out.square().sum()).backward()
	assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
	assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_shared_head_last_weight_is_the_shared_layer_and_zeroing_it_zeroes_the_output():
	block = MoEBlock(IN, HIDDEN, OUT, n_experts=4, shared_head=True)
	assert block[-1].weight.shape == (OUT, HIDDEN[-1]) and isinstance(block[-1].weight, nn.Parameter)
	assert block.experts.features(torch.randn(5, IN)).shape == (4, 5, HIDDEN[-1])
	for p in [block[-1].weight]:   # upstream's init.zero_([model._reward[-1].weight])
		p.data.fill_(0)
	out = block(torch.randn(7, IN))
	assert torch.equal(out, torch.zeros_like(out))


def test_gate_reads_only_its_columns():
	torch.manual_seed(0)
	block = MoEBlock(IN, HIDDEN, OUT, n_experts=4, gate_dims=(8, 12))
	assert block.gate.in_features == 4
	x = torch.randn(20, IN)
	y = x.clone()
	y[:, :8] = torch.randn(20, 8)
	a, b = block.route(x), block.route(y)
	assert torch.equal(a.weights, b.weights) and torch.equal(a.indices, b.indices)
	assert torch.equal(block.route(x.view(4, 5, IN)).weights, a.weights)


def test_kl_term_trains_the_gate_when_the_output_gradient_is_zero():
	torch.manual_seed(0)
	block = MoEBlock(8, [16], 4, n_experts=4, top_k=4, balance="kl", aux_coef=1.0, history_rows=None)
	with torch.no_grad():
		block.gate.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
	x = torch.randn(256, 8)
	(block(x) * 0).sum().backward()
	# The gradient is exactly that of the KL term alone (computed here from the plain model).
	_, aux, _, _ = plain_fork_model(block, x, 1.0, balance="kl")
	expected = torch.autograd.grad(aux, block.gate.bias)[0]
	torch.testing.assert_close(block.gate.bias.grad, expected)
	assert block.gate.bias.grad[0] > 0
	opt = torch.optim.SGD(block.gate.parameters(), lr=1.0)
	start = block.last_aux_loss.item()
	for _ in range(30):
		opt.zero_grad()
		(block(x) * 0).sum().backward()
		opt.step()
	assert block.last_aux_loss.item() < 0.2 * start


def _adaptive(target, *, temperature=1.0, rate=0.05, freeze=0, bounds=(0.5, 2.0), gate_std=1.0):
	torch.manual_seed(0)
	block = MoEBlock(8, [16], 4, n_experts=4, top_k=4, temperature=temperature, target_entropy=target,
					 temperature_rate=rate, temperature_freeze=freeze, temperature_bounds=bounds)
	nn.init.normal_(block.gate.weight, std=gate_std)
	return block


def _train_forward(block, x):
	block(x).square().mean().backward()


def test_temperature_step_is_the_formula_of_the_design():
	block = _adaptive(0.9, temperature=1.3, gate_std=0.5)
	x = torch.randn(64, 8)
	for _ in range(3):
		tau = block.stats()["temperature"].item()
		_, _, _, entropy = plain_fork_model(block, x, tau)
		_train_forward(block, x)
		expected = min(max(tau + 0.05 * math.tanh(0.9 - entropy.item()), 0.5), 2.0)
		assert block.stats()["temperature"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("target,direction,gate_std", [(0.2, -1, 0.5), (0.99 * math.log(4), +1, 3.0)], ids=["down", "up"])
def test_temperature_moves_towards_the_target_from_both_sides_and_stops_at_the_bound(target, direction, gate_std):
	block = _adaptive(target, rate=0.2, gate_std=gate_std)
	x = torch.randn(128, 8)
	taus = [block.stats()["temperature"].item()]
	for _ in range(25):
		_train_forward(block, x)
		taus.append(block.stats()["temperature"].item())
	steps = [b - a for a, b in zip(taus, taus[1:])]
	assert all(s * direction >= 0 for s in steps) and steps[0] * direction > 0
	bound = 2.0 if direction > 0 else 0.5
	assert taus[-1] == pytest.approx(bound) and taus[-2] == pytest.approx(bound)
	assert 0.5 <= min(taus) and max(taus) <= 2.0


def test_temperature_settles_at_the_target_entropy():
	block = _adaptive(0.8, rate=0.05, gate_std=0.5)
	x = torch.randn(256, 8)
	for _ in range(150):   # the gate's weights stay put (no optimizer step): only tau moves
		_train_forward(block, x)
	_, _, _, entropy = plain_fork_model(block, x, block.stats()["temperature"].item())
	assert 0.5 < block.stats()["temperature"].item() < 2.0
	assert entropy.item() == pytest.approx(0.8, abs=0.03)


def test_temperature_frozen_during_freeze_and_only_training_forwards_count():
	block = _adaptive(0.2, temperature=1.5, rate=0.1, freeze=3)
	x = torch.randn(64, 8)
	for _ in range(3):
		_train_forward(block, x)
	assert block.stats()["temperature"].item() == 1.5
	assert block.router.adaptive_temperature.forwards.item() == 3
	with torch.no_grad():
		block(x)
	block.eval()
	block(x).sum().backward()
	block.train()
	assert block.router.adaptive_temperature.forwards.item() == 3 and block.stats()["temperature"].item() == 1.5
	_train_forward(block, x)
	assert block.stats()["temperature"].item() < 1.5


def test_backward_uses_the_forwards_tau():
	# The forward moves tau before backward runs: the gradients must still be those of the forward's
	# tau, i.e. equal a block whose tau is frozen, eagerly and compiled.
	torch.manual_seed(0)
	moving = _adaptive(0.2, temperature=1.5, rate=0.3, gate_std=0.5)
	torch.manual_seed(0)
	frozen = _adaptive(0.2, temperature=1.5, rate=0.3, freeze=10 ** 6, gate_std=0.5)
	x = torch.randn(64, 8)
	_train_forward(moving, x)
	_train_forward(frozen, x)
	assert moving.stats()["temperature"].item() != 1.5 and frozen.stats()["temperature"].item() == 1.5
	for (name, p), q in zip(moving.named_parameters(), frozen.parameters()):
		torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{name}: {m}")
	# Dynamo's caches empty before and after, so that the suite's other compile tests stay within the
	# recompile limit of MoEBlock.forward's code object.
	torch._dynamo.reset()
	try:
		for backend in ("eager", "aot_eager"):
			torch.manual_seed(0)
			moving = _adaptive(0.2, temperature=1.5, rate=0.3, gate_std=0.5)
			torch.compile(moving, fullgraph=True, backend=backend)(x).square().mean().backward()
			assert moving.stats()["temperature"].item() != 1.5
			for (name, p), q in zip(moving.named_parameters(), frozen.parameters()):
				torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{backend} {name}: {m}")
	finally:
		torch._dynamo.reset()


def test_temperature_and_freeze_count_survive_save_and_load():
	block = _adaptive(0.2, temperature=1.5, rate=0.1, freeze=2)
	x = torch.randn(64, 8)
	for _ in range(4):
		_train_forward(block, x)
	buf = io.BytesIO()
	torch.save(block.state_dict(), buf)
	buf.seek(0)
	fresh = _adaptive(0.2, temperature=1.5, rate=0.1, freeze=2)
	fresh.load_state_dict(torch.load(buf, weights_only=True))
	assert fresh.stats()["temperature"].item() == block.stats()["temperature"].item() < 1.5
	assert fresh.router.adaptive_temperature.forwards.item() == 4
	torch.testing.assert_close(fresh(x), block(x))
	_train_forward(fresh, x)
	_train_forward(block, x)
	assert fresh.stats()["temperature"].item() == block.stats()["temperature"].item()


def _live_tensors():
	gc.collect()
	with warnings.catch_warnings():
		warnings.simplefilter("ignore")   # isinstance() on lazily deprecated torch attributes found by gc
		return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_training_forwards_with_fork_options_keep_no_tensors():
	block = MoEBlock(8, [16], 8, n_experts=4, top_k=4, balance="kl", shared_head=True, orthogonal=True,
					 target_entropy=1.0, history_rows=64)
	x = torch.randn(32, 8)
	for _ in range(20):
		block(x).sum().backward()
	before = _live_tensors()
	for _ in range(300):
		block(x).sum().backward()
	assert _live_tensors() <= before
	assert block.router.adaptive_temperature.forwards.item() == 320


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host-sync detection is a CUDA feature")
def test_training_forwards_on_cuda_never_sync_with_the_host():
	torch.manual_seed(0)
	block = MoEBlock(8, [16], 16, n_experts=4, top_k=4, balance="kl", shared_head=True, orthogonal=True,
					 target_entropy=1.0, temperature_rate=0.1).cuda()
	leaky = LeakyForkMoEBlock(8, [16], 16, n_experts=4).cuda()
	x = torch.randn(64, 8, device="cuda")
	block(x).sum().backward()   # lazy CUDA initialisation happens outside the check
	start = block.stats()["temperature"].item()
	torch.cuda.set_sync_debug_mode("error")
	try:
		for _ in range(3):
			block(x).sum().backward()
		with pytest.raises(RuntimeError):   # negative control: the fork's host copy and .item() sync
			leaky(x)
	finally:
		torch.cuda.set_sync_debug_mode(0)
	assert block.stats()["temperature"].item() != start


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_with_fork_options(backend):
	torch.manual_seed(0)
	block = MoEBlock(8, [16, 16], 16, act=SimNorm(), n_experts=4, top_k=4, balance="kl", shared_head=True,
					 orthogonal=True, gate_dims=(4, 8), temperature=1.8, target_entropy=0.75 * math.log(4),
					 temperature_rate=0.1, temperature_freeze=1)

	def same_temperature(step, eager, twin):
		torch.testing.assert_close(twin.stats()["temperature"], eager.stats()["temperature"])
	assert_compiled_matches_eager(block, backend, steps=3, after_step=same_temperature)
	assert block.stats()["temperature"].item() != 1.8


def test_torch_compile_of_a_rollout_steps_the_temperature_once_per_call():
	# Upstream's _update runs the dynamics head `horizon` times inside one compiled graph.
	torch.manual_seed(0)
	block = MoEBlock(16, [16, 16], 16, n_experts=4, top_k=4, balance="kl", shared_head=True, orthogonal=True,
					 temperature=1.8, target_entropy=0.75 * math.log(4), temperature_rate=0.1)
	twin = copy.deepcopy(block)

	def rollout(b, x):
		for _ in range(3):
			x = b(x)
		return x
	compiled = torch.compile(lambda x: rollout(twin, x), fullgraph=True, backend="aot_eager")
	for _ in range(2):
		x = torch.randn(32, 16)
		rollout(block, x).square().sum().backward()
		compiled(x).square().sum().backward()
		for (name, p), q in zip(block.named_parameters(), twin.parameters()):
			torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"{name}: {m}")
		torch.testing.assert_close(twin.stats()["temperature"], block.stats()["temperature"])
	assert twin.router.adaptive_temperature.forwards.item() == 6 and block.stats()["temperature"].item() < 1.8


def test_defaults_build_the_plain_block():
	torch.manual_seed(0)
	plain = MoEBlock(IN, HIDDEN, OUT)
	torch.manual_seed(0)
	explicit = MoEBlock(IN, HIDDEN, OUT, balance="switch", shared_head=False, orthogonal=False, gate_dims=None,
						target_entropy=None, temperature_bounds=(0.5, 2.0), temperature_rate=0.02, temperature_freeze=0,
						last_norm=False, gate_offset=False)
	assert list(plain.state_dict()) == list(explicit.state_dict())
	assert sorted(n for n, _ in plain.named_buffers()) == [
		f"router.{n}" for n in ["_last_aux", "_last_entropy", "_last_rows", "_last_slots", "_last_weight",
								"history.cursor", "history.ring"]]
	assert plain.router.adaptive_temperature is None and repr(plain) == repr(explicit)
	x = torch.randn(9, IN)
	assert torch.equal(plain(x), explicit(x))
	assert plain.stats()["temperature"].item() == 1.0


@pytest.mark.parametrize("kwargs,names", [
	(dict(balance="entropy"), ["balance"]),
	(dict(shared_head=1), ["shared_head"]),
	(dict(orthogonal="yes"), ["orthogonal"]),
	(dict(orthogonal=True, n_experts=20, top_k=2), ["orthogonal", "n_experts=20", "out_dim=16"]),
	(dict(orthogonal=True, shared_head=True, n_experts=30, top_k=2, mlp_dims=[32, 24]),
	 ["orthogonal", "n_experts=30", "mlp_dims[-1]=24"]),
	(dict(shared_head=True, mlp_dims=[]), ["shared_head", "mlp_dims"]),
	(dict(gate_dims=(4, 13)), ["gate_dims"]),
	(dict(gate_dims=(5, 5)), ["gate_dims"]),
	(dict(gate_dims=4), ["gate_dims"]),
	(dict(target_entropy=-0.1), ["target_entropy"]),
	(dict(target_entropy=0.8, top_k=2), ["target_entropy", "top_k=2"]),
	(dict(target_entropy=0.5, temperature=3.0), ["temperature=3.0", "temperature_bounds"]),
	(dict(temperature_bounds=(2.0, 0.5)), ["temperature_bounds"]),
	(dict(temperature_bounds=(0.0, 2.0)), ["temperature_bounds"]),
	(dict(temperature_bounds=1.0), ["temperature_bounds"]),
	(dict(temperature_rate=0.0), ["temperature_rate"]),
	(dict(temperature_freeze=-1), ["temperature_freeze"]),
	(dict(temperature_freeze=1.5), ["temperature_freeze"]),
	(dict(last_norm="yes"), ["last_norm"]),
	(dict(gate_offset=1), ["gate_offset"]),
])
def test_bad_options_raise_value_errors_naming_the_argument(kwargs, names):
	args = dict(mlp_dims=[32], n_experts=4, top_k=2)
	args.update(kwargs)
	with pytest.raises(ValueError) as err:
		MoEBlock(IN, args.pop("mlp_dims"), OUT, **args)
	for name in names:
		assert name in str(err.value)
