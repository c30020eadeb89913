"""
A TD-MPC2 update step on the CPU (model_size=1, upstream's batch_size=256, walker-walk shapes):
plain upstream vs patched with MoE (E=4, k=2) on dynamics/reward/pi, with and without the plugin's
bookkeeping (MoE metrics + memory monitor), vs the fork-style leaky MoE block on the same heads.
Reports updates/s (pytest-benchmark) and resident memory growth per 1,000 updates, measured over
the benchmarked rounds and scaled. Needs $TDMPC2_ROOT.

	TDMPC2_ROOT=/path/to/tdmpc2 python -m pytest benchmarks/test_update.py --benchmark-json=update.json
"""
import ctypes
import gc
import os
import types

import psutil
import pytest
import torch

from tdmpc2_moe import patching, upstream
from tdmpc2_moe.baselines import LeakyMoEBlock

ROUNDS = int(os.environ.get("UPDATE_BENCH_ROUNDS", "200"))
WARMUP = 20
CFG = ["task=walker-walk", "model_size=1", "compile=false", "steps=100000", "device=cpu"]
VARIANTS = {
	"plain": ["use_moe=false", "monitor_mem_interval=0"],
	"moe": ["use_moe=true", "moe_experts=4", "moe_top_k=2"],
	"moe_no_bookkeeping": ["use_moe=true", "moe_experts=4", "moe_top_k=2", "monitor_mem_interval=0"],
	"leaky_fork": ["use_moe=true", "moe_experts=4", "moe_top_k=2", "monitor_mem_interval=0"],
	"leaky_fork_fixed": ["use_moe=true", "moe_experts=4", "moe_top_k=2", "monitor_mem_interval=0"],
}


def _resident_mb():
	"""Returns resident memory in MB after a garbage collection and, on glibc, returning freed heap pages to
	the OS, so that memory an earlier variant freed does not show up as this variant shrinking."""
	gc.collect()
	try:
		ctypes.CDLL("libc.so.6").malloc_trim(0)
	except (OSError, AttributeError):
		pass
	return psutil.Process().memory_info().rss / 2 ** 20


@pytest.fixture(scope="module")
def root():
	if not os.environ.get(upstream.ENV_VAR):
		pytest.skip(f"set {upstream.ENV_VAR} to a TD-MPC2 checkout at commit {upstream.PINNED_COMMIT}")
	return upstream.activate()


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


class LeakyFork(LeakyMoEBlock):
	"""The fork's block as it leaked."""

	def __init__(self, *args, **kwargs):
		super().__init__(*args, **kwargs, fix=False)


class LeakyForkFixed(LeakyMoEBlock):
	"""The fork's block with its trim/clear/gc patch-up (cleared after every update below)."""

	def __init__(self, *args, **kwargs):
		super().__init__(*args, **kwargs, fix=True)


LEAKY = {"leaky_fork": LeakyFork, "leaky_fork_fixed": LeakyForkFixed}


def _agent(variant, monkeypatch):
	"""Returns (agent, buffer) for `variant`; the leaky variants build the fork's block where MoEBlock would go."""
	patching.patch()
	if variant in LEAKY:
		monkeypatch.setattr(patching, "MoEBlock", LEAKY[variant])
	cfg = upstream.load_cfg(CFG + VARIANTS[variant])
	cfg.obs_shape, cfg.action_dim, cfg.episode_length, cfg.seed_steps = {"state": (24,)}, 6, 500, 500
	from tdmpc2 import TDMPC2
	torch.manual_seed(0)
	agent = TDMPC2(cfg)
	if variant == "moe_no_bookkeeping" or variant in LEAKY:
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
	benchmark.pedantic(agent.update, args=(buffer,), rounds=ROUNDS, iterations=1)
	growth = _resident_mb() - before
	benchmark.extra_info.update(rss_mb_per_1000_updates=growth * 1000 / ROUNDS, rounds=ROUNDS,
								threads=torch.get_num_threads(), batch_size=agent.cfg.batch_size)
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
	benchmark.pedantic(bookkeeping, rounds=ROUNDS * 5, iterations=1)
	patching.unpatch()
