"""
MoEBlock vs the fork-style leaky block vs a plain TD-MPC2 mlp, at TD-MPC2 dynamics-head shapes:
training (batch 256 x horizon 3 = 768 rows, forward + backward) and planning (512 samples, no_grad
forward); mlp_dim 384 (model_size 1, latent 128) and 512 (model_size 5, latent 512); E = 4, 8;
k = 1, 2. Variants: `moe` (history on), `moe_nohist` (history_rows=None), `experts` (only the
experts' batched matmuls, no gate or combine), `leaky`, and `plain` (one mlp, no experts).

The fork's model (docs/design.md 5a), dense over E = 4, 8 experts: `dense` (MoEBlock, top_k = E, no
other option), `fork` (MoEBlock with the fork preset's options: KL balance, shared head, orthogonal,
adaptive temperature, history on), `fork_noortho` (the same without `orthogonal`: what the
orthonormalisation costs) and `leaky_fork` (`baselines.LeakyForkMoEBlock`, the fork's layer as
it ran: host list, detached KL, `.item()` per training forward). Their planning rows run in eval mode
(as the fork planned).

`test_fused_dispatch`: the routed-experts operator against dense and the grouped sparse path it replaced
(N = 1 .. 1536 rows, E = 4, 8 with k = 1, 2 and k = E), the measurements behind "auto" picking it.

`test_dispatch`: MoEBlock with dispatch="dense" vs "sparse" (and `padded`, the static-shape sparse
path that CUDA and torch.compile run, here on the CPU) vs a plain mlp, dynamics head at mlp_dim 384,
N = 256, 1536, 8192 rows, E = 4, 8, 16, k = 1, 2, training (forward + backward) and planning
(no_grad forward): the measurements behind `dispatch.choose` ("auto"; see benchmarks/README.md section 5).

On a GPU: TDMPC2_MOE_BENCH_DEVICE=cuda (blocks and inputs on that device, every timed call then ends
with torch.cuda.synchronize(); see bench_device.py).

Summarise a `--benchmark-json` file as the README tables with
`python benchmarks/test_moe_block.py RESULTS.json`.
"""
import json
import math
import os
import sys
import warnings

import pytest
import torch

from bench_device import DEVICE, synced
from tdmpc2_moe.block.baselines import LeakyForkMoEBlock, LeakyMoEBlock, SimNorm, plain_mlp
from tdmpc2_moe.block.dispatch import choose, group_by_expert, run_padded
from tdmpc2_moe.block.moe import MoEBlock

ACTION_DIM = 6
LATENT = {384: 128, 512: 512}
SHAPES = {"train": 256 * 3, "plan": 512}
EXPERTS = [(4, 1), (4, 2), (8, 1), (8, 2)]
VARIANTS = ["moe", "moe_nohist", "experts", "leaky"]
FORK_EXPERTS = [4, 8]
FORK_VARIANTS = ["dense", "fork", "fork_noortho", "leaky_fork"]
DISPATCH_ROWS = [256, 1536, 8192]
DISPATCH_EXPERTS = [(e, k) for e in (4, 8, 16) for k in (1, 2)]
DISPATCH_VARIANTS = ["dense", "sparse", "padded"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
	# One intra-op thread: comparable numbers on a shared, small CPU (process time is timed, see README).
	threads = torch.get_num_threads()
	torch.set_num_threads(1)
	with warnings.catch_warnings():
		warnings.filterwarnings("ignore", message="tdmpc2_moe._C is not built")
		yield
	torch.set_num_threads(threads)


def _head(variant, mlp_dim, n_experts, top_k):
	latent = LATENT[mlp_dim]
	args = (latent + ACTION_DIM, [mlp_dim, mlp_dim], latent, SimNorm())
	torch.manual_seed(0)
	if variant == "plain":
		head = plain_mlp(*args)
	elif variant == "leaky":
		head = LeakyMoEBlock(*args, n_experts=n_experts, top_k=top_k)
	elif variant == "leaky_fork":
		head = LeakyForkMoEBlock(*args, n_experts=n_experts)
	elif variant == "dense":
		head = MoEBlock(*args, n_experts=n_experts, top_k=n_experts)
	elif variant in ("fork", "fork_noortho"):
		head = MoEBlock(*args, n_experts=n_experts, top_k=n_experts, temperature=1.8, aux_coef=0.03, balance="kl",
						shared_head=True, orthogonal=variant == "fork", target_entropy=0.75 * math.log(n_experts))
	else:
		head = MoEBlock(*args, n_experts=n_experts, top_k=top_k, history_rows=None if variant == "moe_nohist" else 65536)
	return head.to(DEVICE)


def _step(head, variant, x):
	"""Returns the callable timed: forward + backward for training rows, a no_grad forward for planning."""
	forward = head.experts if variant == "experts" else head
	if not x.requires_grad:
		if variant in FORK_VARIANTS:
			head.eval()   # the fork planned in eval mode: no temperature step (nor .item()) there

		def plan():
			with torch.no_grad():
				forward(x)
		return synced(plan)

	def train():
		out = forward(x)
		loss = out.square().mean()
		if variant == "leaky":
			loss = loss + head.aux_loss
		loss.backward()
		if variant == "leaky":
			# Keep the never-cleared list from eating the benchmark host's memory; its cost is the append.
			head.gate_history.clear()
		if variant == "leaky_fork":
			head.zero_aux_loss()   # the fork reset its accumulator after every update
	return synced(train)


def _padded(block):
	"""Returns a forward of `block` through the padded sparse path (what CUDA and torch.compile run)."""
	def forward(x):
		gate = block.route(x)
		return run_padded(block.experts.expert_layers, x, group_by_expert(gate.indices, gate.weights, block.n_experts),
						  block.n_experts)
	return forward


@pytest.mark.parametrize("variant", DISPATCH_VARIANTS + ["plain"])
@pytest.mark.parametrize("n_experts,top_k", DISPATCH_EXPERTS, ids=[f"E{e}k{k}" for e, k in DISPATCH_EXPERTS])
@pytest.mark.parametrize("rows", DISPATCH_ROWS)
@pytest.mark.parametrize("mode", ["train", "plan"])
def test_dispatch(benchmark, mode, rows, n_experts, top_k, variant):
	if variant == "plain" and (n_experts, top_k) != DISPATCH_EXPERTS[0]:
		pytest.skip("plain is measured once per shape")
	latent = LATENT[384]
	args = (latent + ACTION_DIM, [384, 384], latent, SimNorm())
	torch.manual_seed(0)
	if variant == "plain":
		forward = plain_mlp(*args).to(DEVICE)
	else:
		block = MoEBlock(*args, n_experts=n_experts, top_k=top_k, history_rows=None,
						 dispatch="sparse" if variant == "padded" else variant).to(DEVICE)
		forward = _padded(block) if variant == "padded" else block
	x = torch.randn(rows, latent + ACTION_DIM, device=DEVICE, requires_grad=mode == "train")
	benchmark.group = f"dispatch {mode} N={rows}"
	benchmark.extra_info.update(variant=variant, mode=mode, rows=rows, n_experts=n_experts, top_k=top_k,
								device=str(DEVICE))

	@synced
	def step():
		if mode == "plan":
			with torch.no_grad():
				forward(x)
		else:
			forward(x).square().mean().backward()
	benchmark.pedantic(step, rounds=int(os.environ.get("DISPATCH_BENCH_ROUNDS", "5")), iterations=1, warmup_rounds=1)


FUSED_ROWS = [1, 16, 64, 256, 1536]
FUSED_EXPERTS = [(4, 1), (4, 2), (8, 1), (8, 2), (4, 4), (8, 8)]
FUSED_VARIANTS = ["dense", "fused", "grouped"]


@pytest.mark.parametrize("variant", FUSED_VARIANTS)
@pytest.mark.parametrize("n_experts,top_k", FUSED_EXPERTS, ids=[f"E{e}k{k}" for e, k in FUSED_EXPERTS])
@pytest.mark.parametrize("rows", FUSED_ROWS)
@pytest.mark.parametrize("mode", ["train", "plan"])
def test_fused_dispatch(benchmark, mode, rows, n_experts, top_k, variant, monkeypatch):
	"""
	The routed-experts operator (`fused`, docs/design.md 22) against dense and the grouped sparse path it
	replaced, at planning's and training's small batches and with top_k == E: the measurements behind
	`dispatch.choose` picking the operator wherever it runs (benchmarks/README.md section 11). CPU only.
	"""
	if DEVICE.type != "cpu":
		pytest.skip("the routed-experts operator has no CUDA kernel in this build")
	from tdmpc2_moe.block import experts as experts_module
	latent = LATENT[384]
	torch.manual_seed(0)
	block = MoEBlock(latent + ACTION_DIM, [384, 384], latent, SimNorm(), n_experts=n_experts, top_k=top_k,
					 history_rows=None, dispatch="dense" if variant == "dense" else "sparse")
	if variant == "grouped":
		monkeypatch.setattr(experts_module, "fused_plan", lambda layers, x: None)
	x = torch.randn(rows, latent + ACTION_DIM, requires_grad=mode == "train")
	if variant == "fused":
		assert experts_module.fused_plan(block.experts.expert_layers, x) is not None
	benchmark.group = f"fused {mode} N={rows}"
	benchmark.extra_info.update(variant=variant, mode=mode, rows=rows, n_experts=n_experts, top_k=top_k, fused=True)

	def step():
		if mode == "plan":
			with torch.no_grad():
				block(x)
		else:
			block(x).square().mean().backward()
	benchmark.pedantic(step, rounds=int(os.environ.get("DISPATCH_BENCH_ROUNDS", "15")), iterations=1, warmup_rounds=2)


def _dispatch_medians(benches, fused):
	"""Returns {(mode, rows, E, k, variant): median ms} of test_fused_dispatch's benchmarks (`fused`) or test_dispatch's."""
	median = {}
	for b in benches:
		i = b["extra_info"]
		if "mode" in i and bool(i.get("fused")) == fused:
			median[(i["mode"], i["rows"], i["n_experts"], i["top_k"], i["variant"])] = b["stats"]["median"] * 1e3
	return median


def summarize_fused(benches):
	"""Returns the README table of test_fused_dispatch: medians (ms), the operator's ratio to dense and the rule's pick."""
	median = _dispatch_medians(benches, fused=True)
	if not median:
		return ""
	lines = ["| mode | N | E | k | dense | fused | grouped | fused / dense | fused / grouped | auto |",
			 "|---|---|---|---|---|---|---|---|---|---|"]
	for mode in ("train", "plan"):
		for rows in FUSED_ROWS:
			for e, k in FUSED_EXPERTS:
				m = {v: median.get((mode, rows, e, k, v), float("nan")) for v in FUSED_VARIANTS}
				auto = choose("auto", static=False, grad=mode == "train", rows=rows, n_experts=e, top_k=k,
							  orthogonal=False, fused=True)
				lines.append(f"| {mode} | {rows} | {e} | {k} | {m['dense']:.3f} | {m['fused']:.3f} | {m['grouped']:.3f} "
							 f"| {m['fused'] / m['dense']:.2f}x | {m['fused'] / m['grouped']:.2f}x | {auto} |")
	return "\n".join(lines)


def _run(benchmark, variant, shape, mlp_dim, n_experts=None, top_k=None):
	head = _head(variant, mlp_dim, n_experts, top_k)
	x = torch.randn(SHAPES[shape], LATENT[mlp_dim] + ACTION_DIM, device=DEVICE, requires_grad=shape == "train")
	benchmark.group = f"{shape} mlp_dim={mlp_dim}" + (f" E={n_experts} k={top_k}" if n_experts else "")
	if variant in FORK_VARIANTS:
		benchmark.group = f"fork {shape} mlp_dim={mlp_dim} E={n_experts}"
	benchmark.extra_info.update(variant=variant, shape=shape, mlp_dim=mlp_dim, n_experts=n_experts, top_k=top_k,
								device=str(DEVICE))
	benchmark.pedantic(_step(head, variant, x), rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n_experts,top_k", EXPERTS, ids=[f"E{e}k{k}" for e, k in EXPERTS])
@pytest.mark.parametrize("mlp_dim", sorted(LATENT))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_moe_block(benchmark, shape, mlp_dim, n_experts, top_k, variant):
	_run(benchmark, variant, shape, mlp_dim, n_experts, top_k)


@pytest.mark.parametrize("variant", FORK_VARIANTS)
@pytest.mark.parametrize("n_experts", FORK_EXPERTS, ids=[f"E{e}" for e in FORK_EXPERTS])
@pytest.mark.parametrize("mlp_dim", sorted(LATENT))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fork_model(benchmark, shape, mlp_dim, n_experts, variant):
	_run(benchmark, variant, shape, mlp_dim, n_experts, n_experts)


@pytest.mark.parametrize("mlp_dim", sorted(LATENT))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_plain_mlp(benchmark, shape, mlp_dim):
	_run(benchmark, "plain", shape, mlp_dim)


def summarize_dispatch(benches):
	"""Returns the dispatch table: medians in ms, sparse / dense, and what `dispatch.choose` ("auto") picks on the CPU."""
	median = _dispatch_medians(benches, fused=False)
	if not median:
		return ""
	lines = ["| mode | N | E | k | plain | dense | sparse | padded | sparse / dense | padded / dense | faster | auto | auto, padded |",
			 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
	for mode in ("train", "plan"):
		for rows in DISPATCH_ROWS:
			plain = median.get((mode, rows, *DISPATCH_EXPERTS[0], "plain"), float("nan"))
			for e, k in DISPATCH_EXPERTS:
				m = {v: median.get((mode, rows, e, k, v), float("nan")) for v in DISPATCH_VARIANTS}
				rule = dict(grad=mode == "train", rows=rows, n_experts=e, top_k=k, orthogonal=False)
				auto, auto_static = choose("auto", static=False, **rule), choose("auto", static=True, **rule)
				faster = "sparse" if m["sparse"] < m["dense"] else "dense"
				lines.append(f"| {mode} | {rows} | {e} | {k} | {plain:.2f} | {m['dense']:.2f} | {m['sparse']:.2f} "
							 f"| {m['padded']:.2f} | {m['sparse'] / m['dense']:.2f}x | {m['padded'] / m['dense']:.2f}x "
							 f"| {faster} | {auto} | {auto_static} |")
	return "\n".join(lines)


def summarize(path):
	"""Returns the README tables (medians in ms and the ratios the targets are about) for a benchmark JSON file."""
	with open(path) as f:
		benches = json.load(f)["benchmarks"]
	median = {}
	for b in benches:
		i = b["extra_info"]
		if "shape" not in i:
			continue
		median[(i["shape"], i["mlp_dim"], i["n_experts"], i["top_k"], i["variant"])] = b["stats"]["median"] * 1e3
	lines = ["| shape | mlp_dim | E | k | plain | experts only | MoEBlock | MoEBlock, no history | leaky "
			 "| history cost | gate+combine overhead | leaky / MoEBlock |",
			 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
	for shape in SHAPES:
		for dim in sorted(LATENT):
			plain = median.get((shape, dim, None, None, "plain"), float("nan"))
			for e, k in EXPERTS:
				m = {v: median.get((shape, dim, e, k, v), float("nan")) for v in VARIANTS}
				lines.append(
					f"| {shape} ({SHAPES[shape]} rows) | {dim} | {e} | {k} | {plain:.2f} | {m['experts']:.2f} | {m['moe']:.2f} "
					f"| {m['moe_nohist']:.2f} | {m['leaky']:.2f} | {100 * (m['moe'] / m['moe_nohist'] - 1):+.1f}% "
					f"| {100 * (m['moe'] / m['experts'] - 1):+.1f}% | {m['leaky'] / m['moe']:.2f}x |")
	lines += ["", "| shape | mlp_dim | E | plain | MoEBlock dense | fork options | fork options, not orthogonal "
			  "| leaky fork | orthogonalisation share | leaky fork / fork options |", "|---|---|---|---|---|---|---|---|---|---|"]
	for shape in SHAPES:
		for dim in sorted(LATENT):
			plain = median.get((shape, dim, None, None, "plain"), float("nan"))
			for e in FORK_EXPERTS:
				m = {v: median.get((shape, dim, e, e, v), float("nan")) for v in FORK_VARIANTS}
				lines.append(
					f"| {shape} ({SHAPES[shape]} rows) | {dim} | {e} | {plain:.2f} | {m['dense']:.2f} | {m['fork']:.2f} "
					f"| {m['fork_noortho']:.2f} | {m['leaky_fork']:.2f} | {100 * (1 - m['fork_noortho'] / m['fork']):.1f}% "
					f"| {m['leaky_fork'] / m['fork']:.2f}x |")
	return "\n".join(lines) + "\n\n" + summarize_dispatch(benches) + "\n\n" + summarize_fused(benches)


if __name__ == "__main__":
	print(summarize(sys.argv[1]))
