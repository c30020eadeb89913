"""
Multitask TD-MPC2 with the fork preset: offline training through `tdmpc2-moe train` on a small
dataset written in upstream's mt30 file format, and `tdmpc2-moe play` / `analyze` on a multitask
checkpoint (per-task routing table, task x expert heatmap). Needs $TDMPC2_ROOT.

Upstream trains multitask agents offline from its mt30/mt80 files (`data_dir/*.pt`, tens of GB):
each a TensorDict of batch [episodes, 501] with obs [.., 24] float32 (zero-padded to the largest
task), action [.., 6] float32 (zero past the task's action dims), reward float32 and task int32
(the index into mt30's task list). The test writes a few episodes of a few mt30 tasks in that
format, with scripted dynamics, and trains on them.

Two things of upstream's offline trainer do not fit a test, and are changed for the test only:
- `OfflineTrainer._load_dataset` hard-codes the buffer capacity to the full mt30 dataset
  (345,690,000 steps); torchrl allocates it up front (33 GB of observations alone), which a
  machine with less memory than that refuses. The run caps the capacity at the test's dataset size
  (a Buffer subclass installed in the trainer module of the training process).
- Evaluation runs every task's environment for `eval_episodes` full episodes at iteration 0 and
  every `eval_freq` iterations: 30 tasks x 500 planning steps each. The run sets `eval_episodes=0`
  (a config key, no patch); evaluation of a multitask agent is exercised by `tdmpc2-moe play`.
The 30 environments of mt30 are still built by upstream's `make_multitask_env` (about 10 s).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tdmpc2_moe.analysis import gate_stats
from tdmpc2_moe.upstream import heads

# mt30 task index -> (name, obs dims, action dims), as upstream's make_multitask_env reports them.
DATA_TASKS = {1: ("walker-walk", 24, 6), 3: ("cheetah-run", 17, 6), 4: ("reacher-easy", 6, 2),
			  10: ("cartpole-swingup", 5, 1)}
MT30_OBS, MT30_ACTION, EPISODE = 24, 6, 501
MT30_ACTION_DIMS = [6, 6, 6, 6, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 5, 4, 4, 6, 6, 6, 6, 6, 6, 4, 3, 3, 2, 1]
UPDATES, LOG_EVERY = 300, 25


def write_mt30_files(data_dir, episodes_per_task=2, seed=0):
	"""
	Writes two files (chunk_0.pt, chunk_1.pt; two tasks each) of `episodes_per_task` episodes per
	task in DATA_TASKS, in upstream's mt30 format. Each task is a fixed random system
	obs' = tanh(A obs + B action) with reward sigmoid(w . obs'); the first step of an episode holds
	the reset observation, with NaN action and reward as upstream's buffers have them.
	Returns the number of steps written.
	"""
	from tensordict import TensorDict
	g = torch.Generator().manual_seed(seed)
	files = [list(DATA_TASKS)[:2], list(DATA_TASKS)[2:]]
	steps = 0
	for i, tasks in enumerate(files):
		obs = torch.zeros(len(tasks) * episodes_per_task, EPISODE, MT30_OBS)
		action = torch.zeros(len(tasks) * episodes_per_task, EPISODE, MT30_ACTION)
		reward = torch.zeros(len(tasks) * episodes_per_task, EPISODE)
		task = torch.zeros(len(tasks) * episodes_per_task, EPISODE, dtype=torch.int32)
		for j, idx in enumerate(tasks):
			_, n_obs, n_act = DATA_TASKS[idx]
			a_mat = torch.linalg.qr(torch.randn(n_obs, n_obs, generator=g))[0] * 0.9
			b_mat = torch.randn(n_obs, n_act, generator=g) * 0.5
			w = torch.randn(n_obs, generator=g)
			for e in range(episodes_per_task):
				row = j * episodes_per_task + e
				s = torch.randn(n_obs, generator=g) * 0.5
				obs[row, 0, :n_obs] = s
				action[row, 0] = float("nan")
				reward[row, 0] = float("nan")
				for t in range(1, EPISODE):
					a = torch.rand(n_act, generator=g) * 2 - 1
					s = torch.tanh(a_mat @ s + b_mat @ a)
					obs[row, t, :n_obs] = s
					action[row, t, :n_act] = a
					reward[row, t] = torch.sigmoid(w @ s)
				task[row] = idx
		td = TensorDict(obs=obs, action=action, reward=reward, task=task, batch_size=(obs.shape[0], EPISODE))
		torch.save(td, os.path.join(data_dir, f"chunk_{i}.pt"))
		steps += td.numel()
	return steps


def _train_offline(root, tmp_path, *overrides):
	"""
	Runs `tdmpc2-moe train task=mt30 ...` in a child process (this file as its script, see
	`_run_training`). Returns its records: per logged iteration the metrics and the process RSS,
	and the path of the final checkpoint.
	"""
	data_dir = tmp_path / "mt30"
	data_dir.mkdir()
	capacity = write_mt30_files(data_dir)
	record = tmp_path / "record.json"
	args = ["--tdmpc2", str(root), "task=mt30", f"data_dir={data_dir}", f"steps={UPDATES}",
			f"eval_freq={LOG_EVERY}", "eval_episodes=0", "enable_wandb=false", "compile=false", "save_video=false",
			"device=cpu", "model_size=1", "batch_size=16", "monitor_mem_interval=0", *overrides]
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
	out = subprocess.run([sys.executable, __file__, str(record), str(capacity), *args], cwd=tmp_path,
						 capture_output=True, text=True, env=env, timeout=400)
	assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
	assert "Training completed successfully" in out.stdout
	assert f"Found 2 files in {data_dir}" in out.stdout
	with open(record) as f:
		return json.load(f), out.stdout


def _mt30_cfg(walker_cfg, *overrides):
	"""The mt30 config as make_multitask_env leaves it (real obs/action dims), without building its 30 environments."""
	cfg = walker_cfg("task=mt30", *overrides)
	assert len(cfg.tasks) == len(MT30_ACTION_DIMS)
	cfg.action_dims = list(MT30_ACTION_DIMS)
	cfg.episode_lengths = [EPISODE - 1] * len(cfg.action_dims)
	return cfg


@pytest.mark.slow
def test_offline_multitask_training_with_the_fork_preset(walker_cfg, tdmpc2_root, tmp_path):
	records, stdout = _train_offline(tdmpc2_root, tmp_path, "use_moe=true", "moe_preset=fork")
	assert "Dynamics: MoEBlock" in stdout and "Reward: MoEBlock" in stdout
	logs = records["logs"]
	assert [r["iteration"] for r in logs] == list(range(0, UPDATES, LOG_EVERY))
	for r in logs:
		for key in ("total_loss", "consistency_loss", "reward_loss", "value_loss", "pi_loss", "moe_aux_loss"):
			assert np.isfinite(r[key]), (r["iteration"], key)
	# The scripted dynamics are learnable: the world model's losses fall.
	first, last = logs[0], logs[-1]
	assert last["consistency_loss"] < 0.5 * first["consistency_loss"]
	assert last["reward_loss"] < first["reward_loss"]
	# Flat memory: after the first 100 updates (allocator and buffer warm-up) RSS stays within a few MB.
	rss = [r["rss_mb"] for r in logs if r["iteration"] >= 100]
	assert max(rss) - rss[0] < 16, rss

	# The trained checkpoint: gates of the task-gated heads read only the task-embedding columns.
	from tdmpc2 import TDMPC2
	state = torch.load(records["checkpoint"], map_location="cpu", weights_only=True)
	assert state["moe"]["moe_gate_input"] == "task"
	cfg = _mt30_cfg(walker_cfg, "use_moe=true", "moe_preset=fork")
	agent = TDMPC2(cfg)
	agent.load(state)
	blocks = heads.moe_blocks(agent.model)
	assert set(blocks) == {"dynamics", "reward"}
	z, a = torch.randn(8, cfg.latent_dim), torch.rand(8, cfg.action_dim) * 2 - 1
	routes = {}
	for name, block in blocks.items():
		assert block.options.gate_dims == (cfg.latent_dim, cfg.latent_dim + cfg.task_dim)
		assert state["model"][f"{heads.HEAD_PREFIX[name]}.router.gate.weight"].shape == (block.n_experts, cfg.task_dim)
		with torch.no_grad():
			for task in DATA_TASKS:
				t = torch.full((8,), task)
				x = [torch.cat([agent.model.task_emb(zz, t), a], -1) for zz in (z, -z)]
				w = [block.route(xx).weights for xx in x]
				torch.testing.assert_close(w[0], w[1])  # the latent and action change nothing
				routes[name, task] = w[0][0]
	# ... and the task does: routing differs between the trained tasks.
	for name in blocks:
		assert not torch.allclose(routes[name, 1], routes[name, 10], atol=1e-4)


PLAYED = ["walker-walk", "cartpole-swingup", "reacher-easy"]


def test_play_and_analyze_a_multitask_checkpoint(walker_cfg, tdmpc2_root, tmp_path, capsys):
	from tdmpc2 import TDMPC2
	from tdmpc2_moe.upstream import patching
	from tdmpc2_moe.cli import main as cli_main
	ckpt = tmp_path / "mt30-fork.pt"
	torch.manual_seed(0)
	agent = TDMPC2(_mt30_cfg(walker_cfg, "use_moe=true", "moe_preset=fork"))
	with torch.no_grad():  # a fresh gate is near uniform for every task; a decisive one, as training makes it
		for block in heads.moe_blocks(agent.model).values():
			block.gate.weight.normal_(0.0, 3.0)
	agent.save(str(ckpt))
	patching.unpatch()
	capsys.readouterr()
	out, steps = tmp_path / "play", 6
	code = cli_main(["play", "--tdmpc2", str(tdmpc2_root), "--checkpoint", str(ckpt), "--num-steps", str(steps),
					 "--tasks", "walker-walk,10,reacher-easy", "--device", "cpu", "--show-weights", "--out", str(out),
					 "task=mt30", "model_size=1", "num_samples=64", "num_elites=8", "num_pi_trajs=8", "iterations=2"])
	printed = capsys.readouterr().out
	assert code == 0

	path = str(out / "weight_stats.npz")
	per_head, lengths, _ = gate_stats.load_weight_stats(path)
	names, episode_tasks = gate_stats.load_tasks(path)
	assert names == PLAYED and episode_tasks.tolist() == [0, 1, 2] and lengths.tolist() == [steps] * 3
	assert set(per_head) == {"dynamics", "reward"}
	for head, arrays in per_head.items():
		w = arrays["weights"]
		assert w.shape == (3 * steps, 4) and (w > 0).all()  # the fork's dense gate
		np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
		per_task = w.reshape(3, steps, 4)
		# The gate reads only the task embedding: constant within a task, different between tasks.
		np.testing.assert_allclose(per_task, np.broadcast_to(per_task[:, :1], per_task.shape), atol=1e-6)
		assert np.abs(per_task[0, 0] - per_task[1, 0]).max() > 1e-3
		np.testing.assert_allclose(arrays["task_mean"], per_task.mean(1), atol=1e-6)
		assert arrays["task_usage"].shape == (3, 4) and arrays["task_entropy"].shape == (3,)

	with np.load(out / "results.npz") as r:
		assert r["tasks"].tolist() == PLAYED and r["episode_tasks"].tolist() == [0, 1, 2]
		assert r["actions"].shape == (3 * steps, 6) and r["observations"].shape == (3 * steps, 24)
		assert (r["actions"][steps:2 * steps, 1:] == 0).all()  # cartpole has one action dim: the rest is masked

	for name in PLAYED:
		assert sum(line.startswith(f"{name} step ") for line in printed.splitlines()) == steps
		assert f"task {name}: 1 episode(s), {steps} steps" in printed
	table = (out / "summary.md").read_text()
	assert table.strip() in printed and "# Routing per task" in table
	for name in PLAYED:
		assert f"| {name} | {steps} |" in table
	assert (out / "tasks_experts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

	assert cli_main(["analyze", path, "--out", str(tmp_path / "again")]) == 0
	assert (tmp_path / "again" / "summary.md").read_text() == table
	assert (tmp_path / "again" / "tasks_experts.png").is_file()


def _run_training(record, capacity, argv):
	"""
	The child process of `_train_offline`: `tdmpc2-moe train argv` with the buffer capacity capped at
	`capacity` steps and upstream's Logger recording each logged iteration's metrics and RSS, and
	saving the final agent, into the JSON file `record`.
	"""
	import psutil
	from tdmpc2_moe.upstream import checkout
	from tdmpc2_moe.cli import main
	checkout.activate(argv[argv.index("--tdmpc2") + 1])
	from common.logger import Logger
	import trainer.offline_trainer as offline

	class DatasetSizedBuffer(offline.Buffer):
		"""Upstream's Buffer with its capacity capped at the size of the test's dataset."""

		def __init__(self, cfg):
			super().__init__(cfg)
			self._capacity = min(self._capacity, capacity)

	logs, process = [], psutil.Process()
	log, finish = Logger.log, Logger.finish

	def log_and_record(self, d, category="train"):
		row = {k: float(v) for k, v in d.items() if "+" not in k and np.ndim(v) == 0}
		row["rss_mb"] = process.memory_info().rss / 2 ** 20
		logs.append(row)
		return log(self, d, category)

	def finish_and_save(self, agent=None):
		path = os.path.abspath("final.pt")
		agent.save(path)
		with open(record, "w") as f:
			json.dump({"logs": logs, "checkpoint": path}, f)
		return finish(self, agent)

	offline.Buffer = DatasetSizedBuffer
	Logger.log, Logger.finish = log_and_record, finish_and_save
	return main(["train", *argv])


if __name__ == "__main__":
	sys.exit(_run_training(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
