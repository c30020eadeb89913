"""
checkpoint.py: atomic writes, the one-line error for a damaged file, the agent/buffer/RNG state of an
upstream run restored exactly, and run_online against upstream's own OnlineTrainer.train loop.
(Killing real training processes: test_checkpoint_faults.py.)
"""
import random

import numpy as np
import pytest
import torch

from tdmpc2_moe.runs import checkpoint, resume


def _state(value):
	return {"weights": torch.full((1000,), float(value)), "step": value}


def test_atomic_save_round_trip_leaves_no_temporary(tmp_path):
	path = tmp_path / "checkpoints" / "latest.pt"
	size = checkpoint.atomic_save(_state(1), path)
	checkpoint.atomic_save(_state(2), path)
	assert size == path.stat().st_size and size > 4000
	state = checkpoint.load(path)
	assert state["step"] == 2 and torch.equal(state["weights"], torch.full((1000,), 2.0))
	assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
	path = tmp_path / "latest.pt"
	checkpoint.atomic_save(_state(1), path)

	class Unpicklable:
		def __reduce__(self):
			raise RuntimeError("disk full")
	with pytest.raises(RuntimeError, match="disk full"):
		checkpoint.atomic_save({"x": Unpicklable()}, path)
	assert checkpoint.load(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def _damaged(path, how):
	data = path.read_bytes()
	if how == "truncated":
		path.write_bytes(data[:len(data) // 2])
	elif how == "corrupted":
		middle = len(data) // 2
		path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
	elif how == "empty":
		path.write_bytes(b"")
	elif how == "not_plain":
		# A pickled object that is not a plain type: weights_only refuses to load it.
		torch.save({"format": checkpoint.FORMAT, "crc32": 0, "state": random.Random(0)}, path)
	elif how == "not_ours":
		torch.save({"model": {}}, path)


@pytest.mark.parametrize("how", ["truncated", "corrupted", "empty", "not_plain", "not_ours"])
def test_damaged_checkpoint_gives_one_line_naming_the_file(tmp_path, how):
	path = tmp_path / "latest.pt"
	checkpoint.atomic_save(_state(1), path)
	_damaged(path, how)
	with pytest.raises(checkpoint.CheckpointError) as info:
		checkpoint.load(path)
	message = str(info.value)
	assert str(path) in message and "\n" not in message and len(message) < 400


def test_missing_checkpoint_is_file_not_found(tmp_path):
	with pytest.raises(FileNotFoundError, match="no checkpoint"):
		checkpoint.load(tmp_path / "latest.pt")


def test_model_file_takes_an_agent_save_or_a_training_checkpoints_checked_model(tmp_path):
	model = {"_dynamics.weight": torch.arange(6.0).reshape(2, 3)}
	saved = tmp_path / "final.pt"
	torch.save({"model": model, "moe": None}, saved)
	assert torch.equal(checkpoint.model_file(saved)["model"]["_dynamics.weight"], model["_dynamics.weight"])
	latest = tmp_path / "latest.pt"
	checkpoint.atomic_save({"agent": {"model": model, "moe": {"use_moe": True}}, "step": 7}, latest)
	loaded = checkpoint.model_file(latest)
	assert loaded["moe"] == {"use_moe": True} and torch.equal(loaded["model"]["_dynamics.weight"], model["_dynamics.weight"])
	# The training checkpoint's model is checked against its checksum: a changed weight is refused.
	tampered = torch.load(latest, weights_only=True)
	tampered["state"]["agent"]["model"]["_dynamics.weight"][0, 0] = 100.0
	torch.save(tampered, latest)
	with pytest.raises(checkpoint.CheckpointError, match="checksum mismatch") as info:
		checkpoint.model_file(latest)
	assert str(latest) in str(info.value)
	with pytest.raises(FileNotFoundError, match="no checkpoint"):
		checkpoint.model_file(tmp_path / "missing.pt")


def test_rng_state_restores_torch_numpy_python(tmp_path):
	state = checkpoint.rng_state()
	checkpoint.atomic_save({"rng": state}, tmp_path / "rng.pt")
	first = (torch.rand(3), np.random.rand(3), random.random())
	checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
	second = (torch.rand(3), np.random.rand(3), random.random())
	assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


# Upstream TD-MPC2 (needs $TDMPC2_ROOT) ------------------------------------------------------------

def test_rng_state_restores_the_environment(walker_cfg):
	# The action space draws the seed-phase random actions, the dm_control task each episode's start.
	from envs import make_env
	env = make_env(walker_cfg())
	env.action_space.seed(0)
	assert set(checkpoint._env_generators(env)) >= {"2.action_space.np_random", "3.task.random"}
	state = checkpoint.rng_state(env)
	first = [env.rand_act() for _ in range(3)] + [env.reset()]
	checkpoint.set_rng_state(state, env)
	second = [env.rand_act() for _ in range(3)] + [env.reset()]
	assert all(torch.equal(a, b) for a, b in zip(first, second))
	assert not torch.equal(first[-1], env.reset())  # a later episode starts elsewhere: the check can fail


def _params(agent):
	return {k: v.detach().clone() for k, v in agent.model.state_dict().items() if torch.is_tensor(v)}


def test_restored_agent_and_buffer_continue_exactly(walker_cfg, make_buffer, tmp_path):
	# Three updates first, so that Adam's moments and step counts are not their initial values when saved.
	from tdmpc2 import TDMPC2
	cfg = walker_cfg("use_moe=true", "moe_experts=2", "batch_size=8", "num_q=2")
	torch.manual_seed(0)
	agent, buffer = TDMPC2(cfg), make_buffer(cfg, episodes=2)
	for _ in range(3):
		agent.update(buffer)
	path = tmp_path / "latest.pt"
	checkpoint.atomic_save({"agent": checkpoint.agent_state(agent),
							"buffer": checkpoint.buffer_state(buffer), "rng": checkpoint.rng_state()}, path)
	want = [agent.update(buffer) for _ in range(3)]
	want_params = _params(agent)

	torch.manual_seed(1)  # another initialisation, an empty buffer: everything must come from the file
	from common.buffer import Buffer
	other, other_buffer = TDMPC2(cfg), Buffer(cfg)
	state = checkpoint.load(path)
	checkpoint.restore_agent(other, state["agent"])
	checkpoint.restore_buffer(other_buffer, state["buffer"])
	checkpoint.set_rng_state(state["rng"])
	assert other_buffer.num_eps == buffer.num_eps == 2
	got = [other.update(other_buffer) for _ in range(3)]
	for w, g in zip(want, got):
		for key in w:
			assert torch.equal(w[key], g[key]), key
	for key, value in _params(other).items():
		assert torch.equal(value, want_params[key]), key
	assert torch.equal(other.scale.value, agent.scale.value)


def test_restore_rejects_other_moe_settings(walker_cfg, tmp_path):
	from tdmpc2 import TDMPC2
	state = checkpoint.agent_state(TDMPC2(walker_cfg("use_moe=true", "moe_experts=2")))
	with pytest.raises(ValueError, match="moe_experts=2.*moe_experts=4"):
		checkpoint.restore_agent(TDMPC2(walker_cfg("use_moe=true", "moe_experts=4")), state)


class _Recorder:
	"""Stands in for the agent's update (the loop, not learning, is under test) and records the loop's calls."""

	def __init__(self, trainer):
		self.trainer, self.calls = trainer, []
		self.log = trainer.logger.log
		trainer.agent.update = self.update
		trainer.logger.log = self.logged

	def update(self, buffer):
		self.calls.append(("update", self.trainer._step, buffer.num_eps))
		return {"total_loss": torch.tensor(float(self.trainer._step))}

	def logged(self, metrics, category):
		kept = {k: float(v) for k, v in metrics.items() if k not in ("elapsed_time", "steps_per_second")}
		self.calls.append(("log", category, kept))
		self.log(metrics, category)


def _trainer(walker_cfg, tmp_path, *overrides):
	from common.buffer import Buffer
	from common.logger import Logger
	from common.seed import set_seed
	from envs import make_env
	from tdmpc2 import TDMPC2
	from trainer.online_trainer import OnlineTrainer
	cfg = walker_cfg("mpc=false", "enable_wandb=false", "save_video=false", "eval_episodes=1", *overrides)
	cfg.work_dir = tmp_path
	set_seed(cfg.seed)
	env = make_env(cfg)
	cfg.seed_steps = 500
	return OnlineTrainer(cfg=cfg, env=env, agent=TDMPC2(cfg), buffer=Buffer(cfg), logger=Logger(cfg))


def test_run_online_is_upstreams_loop(walker_cfg, tmp_path):
	# Upstream's OnlineTrainer.train and run_online (with checkpoints) on the same seeds: the same
	# updates at the same steps, the same logs (episode rewards, evaluations), the same buffer and RNG.
	from trainer.online_trainer import OnlineTrainer
	runs = []
	for name in ("upstream", "run_online"):
		trainer = _trainer(walker_cfg, tmp_path / name, "steps=1100", "eval_freq=500")
		recorder = _Recorder(trainer)
		if name == "upstream":
			OnlineTrainer.train(trainer)  # the patched OnlineTrainer seeded the action space, as for run_online
		else:
			resume.run_online(trainer, interval=500, with_buffer=True)
		runs.append((recorder.calls, checkpoint.buffer_state(trainer.buffer), torch.rand(4), trainer._step))
	(calls_a, buf_a, rng_a, step_a), (calls_b, buf_b, rng_b, step_b) = runs
	assert step_a == step_b == 1101 and calls_a == calls_b
	assert sum(c[0] == "update" for c in calls_a) == 500 + 600 and sum(c[:2] == ("log", "eval") for c in calls_a) == 3
	assert buf_a["num_eps"] == buf_b["num_eps"] == 2 and buf_a["cursor"] == buf_b["cursor"]
	torch.testing.assert_close(buf_a["rows"], buf_b["rows"], rtol=0, atol=0, equal_nan=True)  # first rows: NaN actions
	assert torch.equal(rng_a, rng_b)
	saved = checkpoint.load(tmp_path / "run_online" / "checkpoints" / "latest.pt")
	assert saved["step"] == 1000 and saved["episode"] == 2 and saved["buffer"]["num_eps"] == 2


def test_buffer_restores_into_a_longer_run_unless_it_wrapped(walker_cfg, make_buffer):
	from common.buffer import Buffer
	saved = checkpoint.buffer_state(make_buffer(walker_cfg("steps=5000"), episodes=2))
	longer = Buffer(walker_cfg("steps=8000"))
	checkpoint.restore_buffer(longer, saved)
	assert longer.num_eps == 2 and len(longer._buffer) == 1002 and longer._buffer._writer._cursor == 1002
	wrapped = checkpoint.buffer_state(make_buffer(walker_cfg("steps=600"), episodes=2))
	assert wrapped["write_count"] == 1002 and len(wrapped["rows"]["episode"]) == 600
	with pytest.raises(ValueError, match="capacity 600"):
		checkpoint.restore_buffer(Buffer(walker_cfg("steps=8000")), wrapped)


def test_train_command_checks_the_checkpoint_keys(tdmpc2_root, capsys):
	from tdmpc2_moe.cli import train as train_command
	root = ["--tdmpc2", str(tdmpc2_root)]
	assert train_command.main([*root, "task=mt30", "checkpoint_interval=1000"]) == 2
	assert "offline multitask" in capsys.readouterr().err
	for bad, key in (("checkpoint_interval=-1", "checkpoint_interval"), ("resume=maybe", "resume"),
					 ("checkpoint_buffer=1", "checkpoint_buffer")):
		assert train_command.main([*root, bad]) == 2
		assert key in capsys.readouterr().err
