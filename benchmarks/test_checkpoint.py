"""
Cost of a training checkpoint (checkpoint.py: collect the state, checksum, torch.save, fsync,
rename) at model_size=1 with MoE (E=4, k=2 on dynamics/reward/pi, walker-walk shapes, Adam state
filled), without and with the replay buffer (100k and 1M stored steps; 1M is upstream's default
buffer_size), next to the time of the updates between two checkpoints at the recommended interval
(INTERVAL updates, from the median of one update at upstream's batch_size=256). Needs $TDMPC2_ROOT.

	TDMPC2_ROOT=/path/to/tdmpc2 OMP_NUM_THREADS=1 PYTHONPATH=. pytest -q benchmarks/test_checkpoint.py \\
		--benchmark-json=out/checkpoint.json
	PYTHONPATH=. python benchmarks/test_checkpoint.py out/checkpoint.json   # the table
"""
import json
import os
import sys
import time
import types

import pytest
import torch

from tdmpc2_moe.runs import checkpoint, resume
from tdmpc2_moe.upstream import checkout, patching

# Recommended checkpoint_interval (docs/long_runs.md): a checkpoint every 10,000 steps costs well
# under 1% of the updates between two of them, and a crash loses at most 10,000 steps.
INTERVAL = 10_000
CFG = ["task=walker-walk", "model_size=1", "compile=false", "device=cpu", "use_moe=true", "moe_experts=4",
	   "moe_top_k=2", "monitor_mem_interval=0", "enable_wandb=false"]
ROUNDS = int(os.environ.get("CHECKPOINT_BENCH_ROUNDS", "5"))


@pytest.fixture(scope="module")
def agent():
	"""Returns a patched model_size=1 MoE agent after 10 updates (Adam moments filled), and its config."""
	if not os.environ.get(checkout.ENV_VAR):
		pytest.skip(f"set {checkout.ENV_VAR} to a TD-MPC2 checkout at commit {checkout.PINNED_COMMIT}")
	checkout.activate()
	patching.patch()
	cfg = checkout.load_cfg(CFG + ["steps=1000000"])
	cfg.obs_shape, cfg.action_dim, cfg.episode_length, cfg.seed_steps = {"state": (24,)}, 6, 500, 500
	from tdmpc2 import TDMPC2
	torch.manual_seed(0)
	agent = TDMPC2(cfg)
	buffer = _buffer(cfg, 2)
	for _ in range(10):
		agent.update(buffer)
	yield agent, buffer
	patching.unpatch()


def _buffer(cfg, episodes):
	"""Returns an upstream Buffer holding `episodes` random walker-shaped episodes of 501 rows."""
	from tensordict import TensorDict
	from common.buffer import Buffer
	g = torch.Generator().manual_seed(0)
	buffer = Buffer(cfg)
	n = cfg.episode_length + 1
	for _ in range(episodes):
		buffer.add(TensorDict(obs=torch.randn(n, 24, generator=g), action=torch.rand(n, 6, generator=g) * 2 - 1,
							  reward=torch.rand(n, generator=g), terminated=torch.zeros(n), batch_size=(n,)))
	return buffer


def _trainer(agent, buffer):
	"""The parts of an upstream OnlineTrainer that checkpoint.collect reads (no environment)."""
	logger = types.SimpleNamespace(_eval=[])
	return types.SimpleNamespace(cfg=agent.cfg, _step=500_000, _ep_idx=1000, _start_time=time.time(), logger=logger,
								 agent=agent, buffer=buffer, env=None)


@pytest.mark.parametrize("stored", [0, 100_000, 1_000_000], ids=["model_only", "buffer_100k", "buffer_1M"])
def test_checkpoint(benchmark, agent, stored, tmp_path):
	agent, small = agent
	buffer = _buffer(agent.cfg, stored // 501 + 1) if stored else small
	trainer = _trainer(agent, buffer)
	path = tmp_path / "checkpoints" / "latest.pt"

	def save():
		return checkpoint.atomic_save(resume.collect(trainer, with_buffer=bool(stored)), path)
	size = benchmark.pedantic(save, rounds=ROUNDS, iterations=1, warmup_rounds=1)
	benchmark.extra_info.update(mb=size / 1e6, stored_steps=len(buffer._buffer._storage) if stored else 0)


def test_update(benchmark, agent):
	agent, buffer = agent
	benchmark.pedantic(agent.update, args=(buffer,), rounds=ROUNDS * 10, iterations=1, warmup_rounds=2)
	benchmark.extra_info.update(batch_size=agent.cfg.batch_size, interval=INTERVAL)


def table(path):
	"""Returns the markdown table of a --benchmark-json file of this module."""
	runs = {b["name"]: b for b in json.load(open(path))["benchmarks"]}
	update = runs["test_update"]["stats"]["median"]
	between = update * INTERVAL
	lines = [f"One update (batch_size=256): {update * 1e3:.1f} ms median; {INTERVAL:,} updates between two "
			 f"checkpoints: {between:.0f} s.", "",
			 "| checkpoint | stored steps | MB | ms (median) | % of the updates between two checkpoints |",
			 "|---|---|---|---|---|"]
	for name, kind in (("model_only", "model, optimisers, RNG, counters"), ("buffer_100k", "+ replay buffer"),
					   ("buffer_1M", "+ replay buffer")):
		b = runs[f"test_checkpoint[{name}]"]
		ms = b["stats"]["median"] * 1e3
		lines.append(f"| {kind} | {b['extra_info']['stored_steps']:,} | {b['extra_info']['mb']:.1f} | {ms:.0f} | "
					 f"{100 * ms / 1e3 / between:.4f}% |")
	return "\n".join(lines)


if __name__ == "__main__":
	print(table(sys.argv[1]))
