"""
`ops.orthonormalize` (the compiled op, csrc/ortho_row.h) against the plain-PyTorch reference and
`torch.compile` of the reference (inductor, one static-shape graph per shape), forward and
forward + backward, at TD-MPC2 shapes:
N = 256 (one dynamics step of a 256 batch), 768 (reward head, 3 x 256), 8192 (large batches);
E = 4, 8; width 512 (model_size 5's mlp_dim). Next to them, one training forward + backward of the
MoEBlock with the fork options (`fork`) and the same without `orthogonal` (`fork_noortho`), on the
same rows, so the table says what share of a MoE update the orthonormalisation takes (`fork` runs
`ops.orthonormalize`, i.e. the op; the reference's share is estimated as reference / (`fork_noortho` +
reference)).

Summarise a `--benchmark-json` file with `python benchmarks/test_orthonormalize.py RESULTS.json`.
"""
import json
import math
import sys

import pytest
import torch

from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.ops.operators import backend, orthonormalize
from tdmpc2_moe.ops.reference import orthonormalize_reference

ROWS = [256, 768, 8192]
EXPERTS = [4, 8]
WIDTH = 512
IN_DIM = 512 + 6   # latent + action of model_size 5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
	threads = torch.get_num_threads()
	torch.set_num_threads(1)
	yield
	torch.set_num_threads(threads)


_compiled = {}


def _compiled_reference(shape):
	# One compiled function per shape (dynamic=False): what a user compiling the reference would get.
	if shape not in _compiled:
		_compiled[shape] = torch.compile(orthonormalize_reference, dynamic=False)
	return _compiled[shape]


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", ["op", "reference", "compiled"])
@pytest.mark.parametrize("n_experts", EXPERTS, ids=[f"E{e}" for e in EXPERTS])
@pytest.mark.parametrize("rows", ROWS, ids=[f"N{n}" for n in ROWS])
def test_orthonormalize(benchmark, rows, n_experts, variant, mode):
	assert backend() != "reference"
	torch.manual_seed(0)
	x = torch.randn(n_experts, rows, WIDTH, requires_grad=mode == "fwdbwd")
	grad = torch.randn_like(x)
	fn = {"op": orthonormalize, "reference": orthonormalize_reference}.get(variant) or _compiled_reference(x.shape)

	def step():
		if mode == "fwd":
			with torch.no_grad():
				fn(x)
		else:
			fn(x).backward(grad)
			x.grad = None
	step()   # compiles outside the timed rounds
	benchmark.group = f"orthonormalize N={rows} E={n_experts}"
	benchmark.extra_info.update(rows=rows, n_experts=n_experts, variant=variant, mode=mode)
	benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("variant", ["fork", "fork_noortho"])
@pytest.mark.parametrize("n_experts", EXPERTS, ids=[f"E{e}" for e in EXPERTS])
@pytest.mark.parametrize("rows", ROWS, ids=[f"N{n}" for n in ROWS])
def test_moe_update(benchmark, rows, n_experts, variant):
	torch.manual_seed(0)
	block = MoEBlock(IN_DIM, [WIDTH, WIDTH], 512, n_experts=n_experts, top_k=n_experts, temperature=1.8,
					 aux_coef=0.03, balance="kl", shared_head=True, orthogonal=variant == "fork",
					 target_entropy=0.75 * math.log(n_experts))
	x = torch.randn(rows, IN_DIM, requires_grad=True)

	def step():
		block(x).square().mean().backward()
	benchmark.group = f"orthonormalize N={rows} E={n_experts}"
	benchmark.extra_info.update(rows=rows, n_experts=n_experts, variant=variant, mode="fwdbwd")
	benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)


def summarize(path):
	"""Returns the table (medians in ms, shares and speed-ups) for a benchmark JSON file."""
	with open(path) as f:
		benches = json.load(f)["benchmarks"]
	m = {}
	for b in benches:
		i = b["extra_info"]
		m[(i["rows"], i["n_experts"], i["variant"], i["mode"])] = b["stats"]["median"] * 1e3
	lines = ["| N | E | op fwd | reference fwd | compiled fwd | op fwd+bwd | reference fwd+bwd | compiled fwd+bwd "
			 "| MoE update (fork options) | same, not orthogonal | op fwd+bwd / MoE update "
			 "| reference fwd+bwd / (not orthogonal + reference fwd+bwd) | op speed-up vs reference (fwd / fwd+bwd) "
			 "| op speed-up vs compiled (fwd / fwd+bwd) |",
			 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
	nan = float("nan")
	for n in ROWS:
		for e in EXPERTS:
			g = lambda v, mode: m.get((n, e, v, mode), nan)  # noqa: E731
			ratio = lambda a, b, mode: g(a, mode) / g(b, mode)  # noqa: E731
			lines.append(
				f"| {n} | {e} | {g('op', 'fwd'):.2f} | {g('reference', 'fwd'):.2f} | {g('compiled', 'fwd'):.2f} "
				f"| {g('op', 'fwdbwd'):.2f} | {g('reference', 'fwdbwd'):.2f} | {g('compiled', 'fwdbwd'):.2f} "
				f"| {g('fork', 'fwdbwd'):.2f} | {g('fork_noortho', 'fwdbwd'):.2f} "
				f"| {100 * g('op', 'fwdbwd') / g('fork', 'fwdbwd'):.0f}% "
				f"| {100 * g('reference', 'fwdbwd') / (g('fork_noortho', 'fwdbwd') + g('reference', 'fwdbwd')):.0f}% "
				f"| {ratio('reference', 'op', 'fwd'):.2f}x / {ratio('reference', 'op', 'fwdbwd'):.2f}x "
				f"| {ratio('compiled', 'op', 'fwd'):.2f}x / {ratio('compiled', 'op', 'fwdbwd'):.2f}x |")
	return "\n".join(lines)


if __name__ == "__main__":
	print(summarize(sys.argv[1]))
