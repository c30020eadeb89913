"""
topk_gate (fused kernels) vs the plain-PyTorch reference vs torch.compile(reference), forward and
forward+backward, side by side per shape (pytest-benchmark groups), plus the forward's memory
bandwidth against torch.clone of the logits.

Full table:   pytest benchmarks/test_gating.py --benchmark-json=out/gating.json
Quick subset: pytest benchmarks/test_gating.py -k "N512-E8-k2 or bandwidth"
Autograd path (eager vs torch.compile, with and without history): pytest benchmarks/test_gating.py -k autograd_path
On a GPU: TDMPC2_MOE_BENCH_DEVICE=cuda (every timed call then ends with torch.cuda.synchronize()).
"""
import functools

import pytest
import torch

from bench_device import DEVICE, synced
from tdmpc2_moe import GateHistory, topk_gate
from tdmpc2_moe.ops.reference import topk_gate_reference

SHAPES = [(n, e, k) for n in (256, 512, 1536, 8192) for e in (4, 8, 16, 64) for k in (1, 2)]
# Every graph below is a recompilation of the same code object (the reference), one per shape and mode;
# past dynamo's default limit (8) the rest would silently run the reference eagerly and be timed as "compiled".
torch._dynamo.config.recompile_limit = 2 * len(SHAPES)


@functools.lru_cache(maxsize=None)
def _compiled_reference(n, e, k):
	"""torch.compile of the reference, one static-shape graph per shape (cached across benchmarks)."""
	return torch.compile(functools.partial(topk_gate_reference, k=k), dynamic=False)


def _impl(name, n, e, k):
	if name == "fused":
		return functools.partial(topk_gate, k=k)
	if name == "reference":
		return functools.partial(topk_gate_reference, k=k)
	return _compiled_reference(n, e, k)


def _forward_backward(fn, x):
	gate = fn(x)
	loss = gate.weights.sum() + gate.expert_prob_mean.square().sum() + gate.lse.sum()
	return torch.autograd.grad(loss, x)


@pytest.mark.parametrize("impl", ["fused", "reference", "compiled"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("n, e, k", SHAPES, ids=[f"N{n}-E{e}-k{k}" for n, e, k in SHAPES])
def test_gating(benchmark, impl, mode, n, e, k):
	torch.manual_seed(0)
	fn = _impl(impl, n, e, k)
	benchmark.group = f"{mode} N={n} E={e} k={k}"
	benchmark.extra_info.update(impl=impl, mode=mode, n=n, e=e, k=k)
	benchmark.extra_info.update(device=str(DEVICE))
	if mode == "fwd":
		x = torch.randn(n, e, device=DEVICE)
		fn(x)  # compile / warm up outside the timing
		benchmark(synced(fn), x)
	else:
		x = torch.randn(n, e, device=DEVICE, requires_grad=True)
		_forward_backward(fn, x)
		benchmark(synced(_forward_backward), fn, x)


@pytest.mark.parametrize("e", [64, 8])
@pytest.mark.parametrize("impl", ["fused", "clone"])
def test_bandwidth(benchmark, impl, e):
	"""N=262144, k=2 forward vs torch.clone of the same logits; extra_info holds the bytes moved."""
	n, k = 262144, 2
	x = torch.randn(n, e, device=DEVICE)
	benchmark.group = f"bandwidth N=262144 E={e} k=2"
	if impl == "fused":
		# Reads the logits; writes weights (f32) and indices (i64) [N, k], lse [N], two [E] statistics.
		moved = x.numel() * 4 + n * k * (4 + 8) + n * 4 + 2 * e * 4
		fn = functools.partial(topk_gate, k=k)
	else:
		moved = 2 * x.numel() * 4
		fn = torch.clone
	benchmark.extra_info.update(impl=impl, bytes=moved, e=e, device=str(DEVICE))
	benchmark.pedantic(synced(fn), (x,), rounds=15, warmup_rounds=2)


def _gate_loss(x, history):
	gate = topk_gate(x, 2, history=history)
	return gate.weights.sum() + gate.expert_prob_mean.square().sum() + gate.lse.sum()


_compiled_gate_loss = torch.compile(_gate_loss, fullgraph=True)


@pytest.mark.parametrize("history", [False, True], ids=["plain", "history"])
@pytest.mark.parametrize("path", ["eager", "compiled"])
def test_autograd_path(benchmark, path, history):
	"""
	N=512, E=8, k=2 forward + backward of topk_gate called eagerly and inside torch.compile(fullgraph=True)
	(upstream TD-MPC2's default, compile=true): what the op's autograd registration costs where users run it.
	"""
	torch.manual_seed(0)
	x = torch.randn(512, 8, device=DEVICE, requires_grad=True)
	h = GateHistory(4096, 8, device=DEVICE) if history else None
	fn = _compiled_gate_loss if path == "compiled" else _gate_loss
	benchmark.group = f"autograd path {'with' if history else 'without'} history N=512 E=8 k=2"
	benchmark.extra_info.update(path=path, history=history, device=str(DEVICE))

	def step():
		return torch.autograd.grad(fn(x, h), x)
	step()
	step()
	benchmark(synced(step))


def markdown_table(path):
	"""Returns the README table (medians in microseconds and speed-ups of the fused op) from a pytest-benchmark JSON."""
	import json

	runs = json.load(open(path))["benchmarks"]
	median = {}
	for b in runs:
		info = b["extra_info"]
		if "mode" in info:
			median[(info["mode"], info["n"], info["e"], info["k"], info["impl"])] = b["stats"]["median"] * 1e6
	lines = ["| mode | N | E | k | fused µs | reference µs | compiled µs | vs reference | vs compiled |",
			 "|---|---|---|---|---|---|---|---|---|"]
	for mode in ("fwd", "fwdbwd"):
		for n, e, k in SHAPES:
			f, r, c = (median.get((mode, n, e, k, impl)) for impl in ("fused", "reference", "compiled"))
			if None not in (f, r, c):
				lines.append(f"| {mode} | {n} | {e} | {k} | {f:.1f} | {r:.1f} | {c:.1f} | {r / f:.2f}x | {c / f:.2f}x |")
	for e in (64, 8):
		band = {b["extra_info"]["impl"]: b for b in runs if b["group"] == f"bandwidth N=262144 E={e} k=2"}
		if len(band) == 2:
			rate = {impl: b["extra_info"]["bytes"] / b["stats"]["median"] / 1e9 for impl, b in band.items()}
			lines += ["", f"| N=262144 E={e} k=2 forward | median ms | GB/s |", "|---|---|---|"]
			lines += [f"| {impl} | {band[impl]['stats']['median'] * 1e3:.3f} | {rate[impl]:.2f} |" for impl in ("fused", "clone")]
			lines.append(f"\nE={e}: fused / clone byte rate: {rate['fused'] / rate['clone']:.3f}")
	path_runs = {(b["extra_info"]["path"], b["extra_info"]["history"]): b["stats"]["median"] * 1e6
				 for b in runs if "path" in b["extra_info"]}
	if path_runs:
		lines += ["", "| autograd path N=512 E=8 k=2 fwd+bwd | eager µs | compiled µs |", "|---|---|---|"]
		for history in (False, True):
			eager, compiled = path_runs.get(("eager", history)), path_runs.get(("compiled", history))
			if eager and compiled:
				lines.append(f"| {'with' if history else 'without'} history | {eager:.1f} | {compiled:.1f} |")
	return "\n".join(lines)


if __name__ == "__main__":
	import sys

	print(markdown_table(sys.argv[1]))
