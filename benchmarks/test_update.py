"""
A TD-MPC2 update step and one `act` (planning) on the CPU (model_size=1, upstream's batch_size=256
and planning defaults, walker-walk shapes): plain upstream vs patched with MoE heads on
dynamics/reward/pi (E=4 k=2 and E=8 k=1, dense and sparse dispatch; E=4 k=2 also with `auto`, with
and without the plugin's bookkeeping: MoE metrics + memory monitor) vs the fork-style leaky MoE block
on the same heads, and the fork preset (`use_moe=true moe_preset=fork`: E=4 dense orthogonal experts
with a shared head on dynamics/reward) vs the fork's own MOORE layer re-implemented as it ran
(`baselines.LeakyForkMoEBlock`: host list of gates, per-forward `.item()`, detached KL) in its place. Reports medians (pytest-benchmark) and, for updates,
resident memory growth per 1,000 updates over the benchmarked rounds, scaled. Needs $TDMPC2_ROOT.
On a GPU: TDMPC2_MOE_BENCH_DEVICE=cuda (the agent's `device` setting; every timed call then ends with
torch.cuda.synchronize(); see bench_device.py).

	TDMPC2_ROOT=/path/to/tdmpc2 UPDATE_BENCH_ROUNDS=20 python -m pytest benchmarks/test_update.py \
		--benchmark-json=update.json
	python benchmarks/test_update.py update.json      # the table: medians, ratios to plain and to the leaky fork

UPDATE_BENCH_CFG adds upstream overrides to every variant (e.g. "batch_size=64 num_samples=128": the
learning benchmark's batch and planning samples). benchmarks/alternate.py runs one process per
measurement, variants alternated, and tabulates their medians.
"""
import ctypes
import gc
import json
import os
import sys
import types

import psutil
import pytest
import torch

from bench_device import DEVICE, synced
from tdmpc2_moe.upstream import checkout, patching
from tdmpc2_moe.block.baselines import LeakyForkMoEBlock, LeakyMoEBlock
from tdmpc2_moe.block.moe import MoEBlock

ROUNDS = int(os.environ.get("UPDATE_BENCH_ROUNDS", "200"))
ACT_ROUNDS = int(os.environ.get("ACT_BENCH_ROUNDS", "5"))
WARMUP = 20
CFG = ["task=walker-walk", "model_size=1", "compile=false", "steps=100000", f"device={DEVICE}",
	   *os.environ.get("UPDATE_BENCH_CFG", "").split()]
E4K2, E8K1 = ["moe_experts=4", "moe_top_k=2"], ["moe_experts=8", "moe_top_k=1"]
NO_MONITOR = "monitor_mem_interval=0"
VARIANTS = {
	"plain": ["use_moe=false", NO_MONITOR],
	"moe": ["use_moe=true", *E4K2],
	"moe_no_bookkeeping": ["use_moe=true", *E4K2, NO_MONITOR],
	"moe_e4k2_dense": ["use_moe=true", *E4K2, NO_MONITOR, "moe_dispatch=dense"],
	"moe_e4k2_sparse": ["use_moe=true", *E4K2, NO_MONITOR, "moe_dispatch=sparse"],
	"leaky_fork": ["use_moe=true", *E4K2, NO_MONITOR],
	"leaky_fork_fixed": ["use_moe=true", *E4K2, NO_MONITOR],
	"moe_e8k1_dense": ["use_moe=true", *E8K1, NO_MONITOR, "moe_dispatch=dense"],
	"moe_e8k1_sparse": ["use_moe=true", *E8K1, NO_MONITOR, "moe_dispatch=sparse"],
	"leaky_fork_e8k1": ["use_moe=true", *E8K1, NO_MONITOR],
	"fork_preset": ["use_moe=true", "moe_preset=fork", NO_MONITOR],
	# Compute-matched (docs/design.md 16): 8 experts at half of mlp_dim, top-2: fewer active multiply-adds than plain.
	"moe_matched": ["use_moe=true", "moe_experts=8", "moe_top_k=2", "moe_expert_dim=192", NO_MONITOR],
	# The same through the patched agent's own update (MoE metrics on, as a training run has them).
	"moe_matched_patched": ["use_moe=true", "moe_experts=8", "moe_top_k=2", "moe_expert_dim=192", NO_MONITOR],
	"leaky_fork_preset": ["use_moe=true", "moe_preset=fork", NO_MONITOR],
	# deterministic=true (docs/long_runs.md "Reproducible runs"): its cost beside plain and moe_no_bookkeeping.
	"plain_deterministic": ["use_moe=false", NO_MONITOR, "deterministic=true"],
	"moe_deterministic": ["use_moe=true", *E4K2, NO_MONITOR, "deterministic=true"],
}
# The variants timed through the patched agent's own update and soft_update_target_Q (the others: upstream's).
PATCHED_UPDATE = ("moe", "moe_matched_patched")
ACT_VARIANTS = ["plain", "moe_no_bookkeeping", "moe_matched", "moe_e4k2_dense", "moe_e4k2_sparse", "leaky_fork", "moe_e8k1_dense", "moe_e8k1_sparse",
				"leaky_fork_e8k1", "fork_preset", "leaky_fork_preset", "plain_deterministic", "moe_deterministic"]


def head_cost(model):
	"""
	Returns (parameters, active multiply-adds per row) of the world model's dynamics, reward and pi heads:
	a plain head counts every Linear; a MoE head its gate, top_k experts' layers and its shared layer.
	"""
	params = macs = 0
	for head in (model._dynamics, model._reward, model._pi):
		params += sum(p.numel() for p in head.parameters())
		if isinstance(head, MoEBlock):
			expert = sum(layer.weight[0].numel() for layer in head.experts.expert_layers)
			shared = head[-1].weight.numel() if head.options.shared_head else 0
			macs += head.gate.weight.numel() + head.top_k * expert + shared
		else:
			macs += sum(m.weight.numel() for m in head.modules() if isinstance(m, torch.nn.Linear))
	return params, macs


def _resident_mb():
	"""Returns resident memory in MB after a garbage collection and, on glibc, returning freed heap pages to
	the OS, so that memory an earlier variant freed does not show up as this variant shrinking."""
	gc.collect()
	try:
		ctypes.CDLL("libc.so.6").malloc_trim(0)
	except (OSError, AttributeError):
		pass
	return psutil.Process().memory_info().rss / 2 ** 20


@pytest.fixture(autouse=True)
def _not_deterministic_after():
	"""deterministic=true switches the whole process: every benchmark ends with it off again."""
	yield
	torch.use_deterministic_algorithms(False)
	torch.backends.cudnn.deterministic = False


@pytest.fixture(scope="module")
def root():
	if not os.environ.get(checkout.ENV_VAR):
		pytest.skip(f"set {checkout.ENV_VAR} to a TD-MPC2 checkout at commit {checkout.PINNED_COMMIT}")
	return checkout.activate()


def _buffer(cfg):
	from tensordict import TensorDict
	from common.buffer import Buffer
	g = torch.Generator().manual_seed(0)
	buffer = Buffer(cfg)
	n = cfg.episode_length + 1
	for _ in range(4):
		buffer.add(TensorDict(obs=torch.randn(n, 24, generator=g), action=torch.rand(n, 6, generator=g) * 2 - 1,
							  reward=torch.rand(n, generator=g), terminated=torch.zeros(n), batch_size=(n,)))
	return buffer


# The MoEBlock keywords the leaky block takes; patch() also passes the fork options and `dispatch`,
# which keep their defaults (off, a plain top-k block) in the variants that build the leaky block.
_LEAKY_KEYWORDS = ("n_experts", "top_k", "temperature", "aux_coef", "zloss_coef", "history_rows")


class LeakyFork(LeakyMoEBlock):
	"""The fork's block as it leaked."""

	def __init__(self, *args, **kwargs):
		super().__init__(*args, **{k: kwargs[k] for k in _LEAKY_KEYWORDS}, fix=False)


class LeakyForkFixed(LeakyMoEBlock):
	"""The fork's block with its trim/clear/gc patch-up (cleared after every update below)."""

	def __init__(self, *args, **kwargs):
		super().__init__(*args, **{k: kwargs[k] for k in _LEAKY_KEYWORDS}, fix=True)


# The MoEBlock keywords of the fork preset that the fork's own (leaky) MOORE layer takes; it is dense
# over all experts with a shared head by construction.
_LEAKY_PRESET_KEYWORDS = ("n_experts", "temperature", "aux_coef", "orthogonal", "gate_dims", "target_entropy",
						  "temperature_bounds", "temperature_rate", "temperature_freeze", "history_rows")


class LeakyForkPreset(LeakyForkMoEBlock):
	"""The fork's MOORE layer as it ran (host list of gates, per-forward .item(), detached KL) with the preset's settings."""

	def __init__(self, *args, **kwargs):
		super().__init__(*args, **{k: kwargs[k] for k in _LEAKY_PRESET_KEYWORDS if k in kwargs})


LEAKY = {"leaky_fork": LeakyFork, "leaky_fork_fixed": LeakyForkFixed, "leaky_fork_e8k1": LeakyFork,
		 "leaky_fork_preset": LeakyForkPreset}
_LEAKY_BLOCKS = (LeakyMoEBlock, LeakyForkMoEBlock)


def _moe_or_leaky_blocks(model):
	# patch() checks that every head in moe_heads became a MoE head; with the leaky block in MoEBlock's
	# place that check has to recognise the leaky block too.
	heads = dict(dynamics=model._dynamics, reward=model._reward, pi=model._pi)
	return {name: m for name, m in heads.items() if isinstance(m, (MoEBlock, *_LEAKY_BLOCKS))}


def _agent(variant, monkeypatch):
	"""Returns (agent, buffer) for `variant`; the leaky variants build the fork's block where MoEBlock would go."""
	patching.patch()
	if variant in LEAKY:
		monkeypatch.setattr(patching, "MoEBlock", LEAKY[variant])
		monkeypatch.setattr(patching, "moe_blocks", _moe_or_leaky_blocks)
	cfg = checkout.load_cfg(CFG + VARIANTS[variant])
	cfg.obs_shape, cfg.action_dim, cfg.episode_length, cfg.seed_steps = {"state": (24,)}, 6, 500, 500
	from tdmpc2 import TDMPC2
	torch.manual_seed(0)
	agent = TDMPC2(cfg)
	if variant not in PATCHED_UPDATE:
		# Upstream's own update functions on this agent: no MoE metrics, no monitor.
		agent._update = types.MethodType(patching.original_of(TDMPC2, "_update"), agent)
		agent.update = types.MethodType(patching.original_of(TDMPC2, "update"), agent)
		# The MoE metrics are computed in the patched soft_update_target_Q (so they join upstream's
		# closing compiled graph): upstream's own here too, or "off" would still compute them.
		from common.world_model import WorldModel
		agent.model.soft_update_target_Q = types.MethodType(
			patching.original_of(WorldModel, "soft_update_target_Q"), agent.model)
	if variant == "leaky_fork_fixed":
		blocks = [m for m in agent.model.modules() if isinstance(m, LeakyMoEBlock)]
		update = agent.update

		def update_and_trim(buffer):
			info = update(buffer)
			for block in blocks:
				block.clear_after_update()
			return info
		agent.update = update_and_trim
	return agent, _buffer(cfg)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_update_step(benchmark, variant, root, monkeypatch):
	agent, buffer = _agent(variant, monkeypatch)
	for _ in range(WARMUP):
		agent.update(buffer)
	before = _resident_mb()
	benchmark.group = "update"
	benchmark.pedantic(synced(agent.update), args=(buffer,), rounds=ROUNDS, iterations=1)
	growth = _resident_mb() - before
	params, macs = head_cost(agent.model) if variant not in LEAKY else (None, None)
	benchmark.extra_info.update(variant=variant, rss_mb_per_1000_updates=growth * 1000 / ROUNDS, rounds=ROUNDS,
								threads=torch.get_num_threads(), batch_size=agent.cfg.batch_size, device=str(DEVICE),
								head_params=params, head_macs_per_row=macs)
	patching.unpatch()


@pytest.mark.parametrize("variant", ACT_VARIANTS)
def test_act(benchmark, variant, root, monkeypatch):
	"""One `act` at upstream's default planning (512 samples, 6 MPPI iterations, horizon 3, 24 pi trajectories)."""
	agent, buffer = _agent(variant, monkeypatch)
	for _ in range(3):
		agent.update(buffer)
	obs = torch.randn(24, generator=torch.Generator().manual_seed(0))

	@synced
	def act():
		agent.act(obs, t0=True)
		for block in agent.model.modules():
			if isinstance(block, _LEAKY_BLOCKS):
				# Keep the never-cleared list from eating the host's memory; its cost is the append.
				block.gate_history.clear()
	benchmark.group = "act"
	benchmark.pedantic(act, rounds=ACT_ROUNDS, iterations=1, warmup_rounds=1)
	benchmark.extra_info.update(variant=variant, threads=torch.get_num_threads(), device=str(DEVICE),
								num_samples=agent.cfg.num_samples, iterations=agent.cfg.iterations)
	patching.unpatch()


def test_bookkeeping_alone(benchmark, root, monkeypatch):
	"""The plugin's per-update bookkeeping by itself: MoE metrics (E=4, three heads) + one monitor step."""
	agent, buffer = _agent("moe", monkeypatch)
	for _ in range(WARMUP):
		agent.update(buffer)
	rows = agent.cfg.batch_size

	def bookkeeping():
		patching.moe_metrics(agent.model, rows)
		agent.memory_monitor.step()
	benchmark.pedantic(synced(bookkeeping), rounds=ROUNDS * 5, iterations=1)
	patching.unpatch()


def _leaky_of(variant):
	if "preset" in variant:
		return "leaky_fork_preset"
	return "leaky_fork_e8k1" if "e8k1" in variant else "leaky_fork"


def summarize(path):
	"""Returns the README table for a benchmark JSON file: medians in ms and the ratios the targets are about."""
	with open(path) as f:
		benches = json.load(f)["benchmarks"]
	median = {(b["group"], b["extra_info"]["variant"]): b["stats"]["median"] * 1e3
			  for b in benches if "variant" in b["extra_info"]}
	cost = {b["extra_info"]["variant"]: (b["extra_info"].get("head_params"), b["extra_info"].get("head_macs_per_row"))
			for b in benches if b["group"] == "update" and "variant" in b["extra_info"]}
	lines = ["| variant | head params | active MACs / row | update ms | / plain | / leaky fork | act ms | / plain | "
			 "/ leaky fork |", "|---|---|---|---|---|---|---|---|---|"]
	for variant in VARIANTS:
		if not any((group, variant) in median for group in ("update", "act")):
			continue
		cells = []
		for group in ("update", "act"):
			m = median.get((group, variant))
			plain = median.get((group, "plain"), float("nan"))
			leaky = median.get((group, _leaky_of(variant)), float("nan"))
			to_leaky = "-" if leaky != leaky else f"{m / leaky:.2f}x" if m is not None else "-"  # NaN: no leaky variant run
			cells.append("- | - | -" if m is None else f"{m:.1f} | {m / plain:.2f}x | {to_leaky}")
		params, macs = cost.get(variant, (None, None))
		size = "- | -" if params is None else f"{params / 1e6:.2f} M | {macs / 1e3:.0f} k"
		lines.append(f"| {variant} | {size} | {' | '.join(cells)} |")
	return "\n".join(lines)


if __name__ == "__main__":
	print(summarize(sys.argv[1]))
