"""
`tdmpc2-moe import-fork` (tdmpc2_moe/runs/fork_import.py, cli/import_fork.py) against the fork's own code.

With $FORK_ROOT (a checkout of SC-Levi/boya_tdmpc2 at e42a5c0, kept outside the repository) and
$TDMPC2_ROOT: tests/fork_agent.py runs the fork's agent on the CPU in a subprocess (its modules share
upstream's top-level names), runs ten of its own updates, saves with its own `save` and records its
outputs; the test imports that file and compares the patched agent's outputs on the same inputs:
every head in eval mode within 1e-5, and training forwards past the freeze (both temperatures moving)
within 1e-4, single-task and mt30. Then `play` and a training run start from the imported file.
Bad-input cases that need no checkout run everywhere.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tdmpc2_moe.analysis import gate_stats
from tdmpc2_moe.cli import main as cli_main
from conftest import TESTS

FORK_ENV = "FORK_ROOT"
FORK_COMMIT = "e42a5c0"
HERE = Path(__file__).resolve().parent
MT30_ACTION_DIMS = [6, 6, 6, 6, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 5, 4, 4, 6, 6, 6, 6, 6, 6, 4, 3, 3, 2, 1]
# The fork run's keys (tests/fork_agent.py): upstream's names for the same model.
RUN_KEYS = ["model_size=1", "steps=100000"]


def _error(capsys):
	err = capsys.readouterr().err.strip()
	assert err.startswith("tdmpc2-moe import-fork: ") and len(err.splitlines()) == 1, err
	return err


# Bad input without any checkout ----------------------------------------------------------------

def _import(tmp_path, path, *keys):
	out = tmp_path / "out.pt"
	code = cli_main(["import-fork", str(path), "--out", str(out), *keys])
	assert not out.exists() and not Path(f"{out}.tmp").exists()
	return code


def test_missing_file(tmp_path, capsys):
	assert _import(tmp_path, tmp_path / "nope.pt") == 1
	assert "nope.pt: no such file" in _error(capsys)


def test_file_that_is_not_a_checkpoint(tmp_path, capsys):
	path = tmp_path / "notes.pt"
	path.write_bytes(b"not a checkpoint")
	assert _import(tmp_path, path) == 1
	assert "notes.pt: not a readable PyTorch checkpoint" in _error(capsys)


def test_upstream_checkpoint_is_not_a_fork_checkpoint(tmp_path, capsys):
	path = tmp_path / "upstream.pt"
	torch.save({"model": {"_Qs.params.0.weight": torch.zeros(2, 3, 4), "_pi.0.weight": torch.zeros(3, 3)}}, path)
	assert _import(tmp_path, path) == 1
	err = _error(capsys)
	assert "upstream.pt: not a TD-MPC2 fork checkpoint" in err and "_Qs.modules_list.0.0.weight" in err


def test_fork_checkpoint_without_moe(tmp_path, capsys):
	path = tmp_path / "plain_fork.pt"
	torch.save({"model": {"_Qs.modules_list.0.0.weight": torch.zeros(3, 4), "_dynamics.0.weight": torch.zeros(3, 3)}},
			   path)
	assert _import(tmp_path, path) == 1
	err = _error(capsys)
	assert "plain_fork.pt" in err and "without MoE heads" in err and "_dynamics.gate.weight" in err


def test_plugin_checkpoint_is_not_the_forks(tmp_path, capsys):
	path = tmp_path / "ours.pt"
	torch.save({"model": {"_dynamics.gate.weight": torch.zeros(4, 3)}, "moe": {"use_moe": True}}, path)
	assert _import(tmp_path, path) == 1
	assert "a tdmpc2-moe checkpoint" in _error(capsys)


# Against the fork's own code ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def fork_root():
	"""Returns $FORK_ROOT, a checkout of the fork; skips when it is not set."""
	root = os.environ.get(FORK_ENV)
	if not root:
		pytest.skip(f"set {FORK_ENV} to a checkout of github.com/SC-Levi/boya_tdmpc2 at commit {FORK_COMMIT}")
	if not (Path(root) / "tdmpc2" / "Mooretdmpc.py").is_file():
		pytest.skip(f"{FORK_ENV}={root} is not a checkout of the fork (no tdmpc2/Mooretdmpc.py)")
	return root


@pytest.fixture(scope="session")
def fork_runs(fork_root, tmp_path_factory):
	"""Returns {task: directory with fork.pt and reference.pt} written by the fork's own agent (tests/fork_agent.py)."""
	runs = {}
	for task in ("walker-walk", "mt30"):
		out = tmp_path_factory.mktemp(f"fork-{task}")
		env = dict(os.environ, OMP_NUM_THREADS="1")
		done = subprocess.run([sys.executable, str(TESTS / "fork_agent.py"), fork_root, task, str(out)],
							  capture_output=True, text=True, env=env, timeout=300)
		assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
		runs[task] = out
	return runs


def _agent(walker_cfg, task, *overrides):
	from tdmpc2 import TDMPC2
	cfg = walker_cfg(f"task={task}", "use_moe=true", "moe_preset=fork", *RUN_KEYS, *overrides)
	if cfg.multitask:
		cfg.action_dims = list(MT30_ACTION_DIMS)
		cfg.episode_lengths = [500] * len(cfg.tasks)
	return TDMPC2(cfg)


def _max_diff(a, b):
	return (a - b).abs().max().item()


@pytest.mark.parametrize("task", ["walker-walk", "mt30"])
def test_imported_model_computes_what_the_fork_computed(task, fork_runs, walker_cfg, tdmpc2_root, tmp_path, capsys):
	run = fork_runs[task]
	out = tmp_path / "imported.pt"
	assert cli_main(["import-fork", "--tdmpc2", str(tdmpc2_root), str(run / "fork.pt"), "--out", str(out),
					 f"task={task}", *RUN_KEYS]) == 0
	printed = capsys.readouterr().out
	assert f"wrote {out}" in printed and "_dynamics.router.gate.bias [4] <- _dynamics.gate.weight[:, -1]" in printed
	assert ("columns [z, a, emb] -> [z, emb, a]" in printed) == (task == "mt30")
	ref = torch.load(run / "reference.pt", weights_only=True)
	agent = _agent(walker_cfg, task)
	agent.load(str(out))  # the patched agent's own load
	model = agent.model
	obs, action, task_ids = ref["obs"], ref["action"], ref["task"]
	diffs = {}
	with torch.no_grad():
		z = model.encode(obs, task_ids)
		outputs = dict(z=z, next=model.next(z, action, task_ids), reward=model.reward(z, action, task_ids),
					   q_all=model.Q(z, action, task_ids, return_type="all"),
					   q_target=model.Q(z, action, task_ids, return_type="all", target=True))
		torch.manual_seed(7)
		pi_action, info = model.pi(z, task_ids)
		outputs.update(pi_action=pi_action, pi_mean=info["mean"], pi_log_std=info["log_std"])
	for name, value in outputs.items():
		diffs[name] = _max_diff(value, ref[name])
		torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-5, msg=lambda m: f"{task} {name}: {m}")
	# Training forwards past the freeze: both temperatures move, step for step as the fork's did.
	blocks = {"dynamics": model._dynamics, "reward": model._reward}
	for name, block in blocks.items():
		assert int(block.router.adaptive_temperature.forwards) == ref["freeze_steps"][name] == block.router.adaptive_temperature.freeze
	model.train()
	train = {h: {"out": [], "tau": []} for h in blocks}
	for _ in range(len(ref["train"]["dynamics"]["tau"])):
		train["dynamics"]["out"].append(model.next(z, action, task_ids).detach())
		train["reward"]["out"].append(model.reward(z, action, task_ids).detach())
		for h, block in blocks.items():
			train[h]["tau"].append(float(block.router.adaptive_temperature.tau))
	model.eval()
	for h in blocks:
		taus = torch.tensor(train[h]["tau"])
		assert (ref["train"][h]["tau"] < 1.8 - 1e-3).all()  # moving
		torch.testing.assert_close(taus, ref["train"][h]["tau"], rtol=0, atol=1e-5)
		diffs[f"train_{h}"] = _max_diff(torch.stack(train[h]["out"]), ref["train"][h]["out"])
		torch.testing.assert_close(torch.stack(train[h]["out"]), ref["train"][h]["out"], rtol=0, atol=1e-4)
	print(f"\n{task} max abs difference to the fork: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def test_the_forks_own_bugs_that_the_guide_states(fork_runs):
	# docs/coming_from_the_fork.md, "What the fork's users trained": checked on the fork's own agent.
	for task, run in fork_runs.items():
		facts = torch.load(run / "reference.pt", weights_only=True)["facts"]
		assert facts["pi_loss_has_a_gradient_through_q"] is False, task
		assert facts["q_zero_init_reached_the_modules"] is False, task
		assert facts["checkpoint_holds_the_temperature"] is False, task
		assert facts["episodic_agent_error"].startswith("AttributeError") and "_termination" in facts["episodic_agent_error"]


def test_bad_fork_files_name_the_key(fork_runs, tdmpc2_root, tmp_path, capsys):
	state = torch.load(fork_runs["walker-walk"] / "fork.pt", weights_only=True)["model"]
	cases = {
		"missing": ({k: v for k, v in state.items() if k != "_reward.trunk.1.model_layers.2.1.ln.bias"},
					"missing key _reward.trunk.1.model_layers.2.1.ln.bias"),
		"extra": (dict(state, **{"_dynamics.trunk.1.model_layers.4.0.weight": torch.zeros(3)}),
				  "key _dynamics.trunk.1.model_layers.4.0.weight"),
	}
	for name, (model, message) in cases.items():
		path = tmp_path / f"{name}.pt"
		torch.save({"model": model}, path)
		assert _import(tmp_path, path, "--tdmpc2", str(tdmpc2_root), "task=walker-walk", *RUN_KEYS) == 1
		err = _error(capsys)
		assert f"{name}.pt" in err and message in err, err
	# Shapes that do not fit the given task / size: the parameter and both shapes are named.
	path = fork_runs["walker-walk"] / "fork.pt"
	assert _import(tmp_path, path, "--tdmpc2", str(tdmpc2_root), "task=cheetah-run", *RUN_KEYS) == 1
	err = _error(capsys)
	assert "_encoder.state.0.weight has shape (256, 24)" in err and "(256, 17)" in err, err
	assert _import(tmp_path, path, "--tdmpc2", str(tdmpc2_root), "task=walker-walk", "model_size=5", "steps=100000") == 1
	assert "has shape" in _error(capsys)
	assert _import(tmp_path, path, "--tdmpc2", str(tdmpc2_root), "--tau-reward", "3.0", "task=walker-walk") == 1
	assert "--tau-reward=3.0 is outside moe_temperature_bounds" in _error(capsys)
	assert _import(tmp_path, path, "--tdmpc2", str(tdmpc2_root), "task=walker-walk", "moe_preset=fork") == 1
	assert "moe_preset= is set by import-fork" in _error(capsys)


def test_sizes_come_from_the_file_when_the_task_cannot_be_made_here(fork_runs, tdmpc2_root, tmp_path, capsys):
	# A fork run on a suite this machine cannot make (Meta-World: no release on the package index runs with
	# upstream at the pinned commit, docs/task_families.md): the sizes come from the file's shapes.
	out = tmp_path / "mw.pt"
	assert cli_main(["import-fork", "--tdmpc2", str(tdmpc2_root), str(fork_runs["walker-walk"] / "fork.pt"),
					 "--out", str(out), "task=mw-reach", *RUN_KEYS]) == 0
	assert "sizes from the file's shapes (_encoder.state.0.weight, _pi.2.weight" in capsys.readouterr().out
	assert torch.load(out, weights_only=True)["model"]["_encoder.state.0.weight"].shape == (256, 24)


@pytest.mark.slow
def test_play_and_training_start_from_an_imported_checkpoint(fork_runs, tdmpc2_root, tmp_path, capsys):
	out = tmp_path / "imported.pt"
	assert cli_main(["import-fork", "--tdmpc2", str(tdmpc2_root), str(fork_runs["walker-walk"] / "fork.pt"),
					 "--out", str(out), "--tau-dynamics", "1.5", "task=walker-walk", *RUN_KEYS]) == 0
	saved = torch.load(out, weights_only=True)
	assert float(saved["model"]["_dynamics.router.adaptive_temperature.tau"]) == 1.5
	assert float(saved["model"]["_reward.router.adaptive_temperature.tau"]) == pytest.approx(1.8)
	play_dir, steps = tmp_path / "play", 10
	assert cli_main(["play", "--tdmpc2", str(tdmpc2_root), "--checkpoint", str(out), "--num-steps", str(steps),
					 "--device", "cpu", "--out", str(play_dir), "task=walker-walk", *RUN_KEYS,
					 "num_samples=64", "num_elites=8", "num_pi_trajs=8", "iterations=2"]) == 0
	capsys.readouterr()
	per_head, lengths, _ = gate_stats.load_weight_stats(str(play_dir / "weight_stats.npz"))
	assert set(per_head) == {"dynamics", "reward"} and lengths.tolist() == [steps]
	for head, arrays in per_head.items():
		assert arrays["weights"].shape == (steps, 4) and np.isfinite(arrays["weights"]).all()
		np.testing.assert_allclose(arrays["weights"].sum(-1), 1.0, atol=1e-5)
		assert (play_dir / f"gates_{head}.png").is_file()

	# upstream's checkpoint= key: the run's agent loads the model before its first step.
	args = ["--tdmpc2", str(tdmpc2_root), "task=walker-walk", "steps=520", "seed_steps=500", "eval_freq=100000",
			"eval_episodes=1", "enable_wandb=false", "compile=false", "save_video=false", "device=cpu",
			"batch_size=16", "mpc=false", "use_moe=true", "moe_preset=fork", *RUN_KEYS[:1],
			"monitor_mem_interval=0", f"checkpoint={out}", "save_agent=true"]
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
	done = subprocess.run([sys.executable, "-m", "tdmpc2_moe", "train", *args], cwd=tmp_path,
						  capture_output=True, text=True, env=env, timeout=420)
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	assert f"starting from the model in checkpoint={out}" in done.stdout
	final = tmp_path / "logs" / "walker-walk" / "1" / "default" / "models" / "final.pt"
	trained = torch.load(final, weights_only=True)["model"]
	# Finite losses leave finite weights: a NaN or inf loss would have spread to every trained parameter.
	assert all(torch.isfinite(v).all() for v in trained.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
	# It continued from the import: the forward count went on from the fork's, and the weights moved from it.
	assert int(trained["_dynamics.router.adaptive_temperature.forwards"]) > int(saved["model"]["_dynamics.router.adaptive_temperature.forwards"])
	assert not torch.equal(trained["_dynamics.experts.layers.0.weight"], saved["model"]["_dynamics.experts.layers.0.weight"])
