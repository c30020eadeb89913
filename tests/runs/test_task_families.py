"""
The task families through `tdmpc2-moe train` and `play`, as a user runs them (docs/design.md 21): short real
MoE training runs on Gymnasium's Humanoid-v4 (with the actions it receives checked against its +-0.4 bounds)
and Walker2d-v4, a multitask agent over two Gymnasium tasks of different shapes trained online and played
per task, MyoSuite's myo-key-turn-hard (upstream's own env code, whose Timeout assignment crashed) and
HumanoidBench's h1hand-run-v0 trained, played and rendered; and each input that cannot run refused with
one line and exit 1 before any step, with nothing written. Needs $TDMPC2_ROOT; MyoSuite and HumanoidBench
where installed (scripts/setup_venv.sh installs MyoSuite, and HumanoidBench when a source tree is found).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTS
from tdmpc2_moe.cli import main as cli_main
from tdmpc2_moe.families import humanoid_bench, upstream_families

pytestmark = pytest.mark.slow
# Upstream's smallest model with planning cut down to a few samples: these runs check that a family
# trains, plays and renders, not what it learns. `checkpoint_interval` runs the loop that waits for
# the buffer's first episode, so seed_steps may be shorter than a (1000-step) episode.
RUN = ["model_size=1", "device=cpu", "compile=false", "batch_size=16", "num_samples=16", "num_elites=4",
	   "num_pi_trajs=2", "iterations=1", "eval_episodes=1", "eval_freq=100000", "enable_wandb=false",
	   "save_video=false", "save_agent=true", "monitor_mem_interval=0", "use_moe=true", "checkpoint_interval=100000"]
HUMANOID_BENCH_ENV = "HUMANOID_BENCH_ROOT"


def _run(cwd, *args, env=None, timeout=900):
	"""Runs `tdmpc2-moe ARGS` in a fresh process in `cwd` on one torch thread; returns the finished process."""
	env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
	return subprocess.run([sys.executable, "-m", "tdmpc2_moe", *args], cwd=cwd, env=env, capture_output=True,
						  text=True, timeout=timeout)


def _train(root, cwd, *keys, env=None):
	done = _run(cwd, "train", "--tdmpc2", str(root), *RUN, *keys, env=env)
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	work = [p.parent for p in Path(cwd, "logs").rglob("run.json")]
	assert len(work) == 1, work
	record = json.loads((work[0] / "run.json").read_text())
	assert record["status"] == "finished"
	return work[0]


def _play(root, cwd, work, *keys, video=False):
	out = Path(cwd) / "play_out"
	done = _run(cwd, "play", "--tdmpc2", str(root), "--checkpoint", str(work / "models" / "final.pt"), "--episodes", "1",
				"--num-steps", "20", "--device", "cpu", "--out", str(out), *(["--record-video"] if video else []),
				"model_size=1", "num_samples=16", "num_elites=4", "num_pi_trajs=2", "iterations=1", *keys)
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	return out, done.stdout


def test_humanoid_v4_trains_with_its_actions_rescaled_to_its_bounds(tdmpc2_root, tmp_path):
	probe = tmp_path / "actions.txt"
	env = dict(os.environ, ACTION_PROBE_FILE=str(probe), PYTHONPATH=os.pathsep.join([str(TESTS / "families"),
																					 os.environ.get("PYTHONPATH", "")]))
	work = _train(tdmpc2_root, tmp_path, "task=gym:Humanoid-v4", "episodic=true", "steps=300", "seed_steps=150",
				  "env_module=action_probe", env=env)
	extremes = np.loadtxt(probe)
	assert len(extremes) >= 300  # every training step, plus the first evaluation's
	# Humanoid-v4 takes +-0.4; the run's actions (uniform in [-1, 1] in the seed phase) reach close to it.
	assert extremes.min() >= -0.4 - 1e-6 and extremes.max() <= 0.4 + 1e-6
	assert extremes.min() < -0.39 and extremes.max() > 0.39
	rows = (work / "eval.csv").read_text().splitlines()
	assert rows[0] == "step,episode_reward" and len(rows) == 2


def test_walker2d_trains_and_its_falls_are_learned_as_terminations(tdmpc2_root, tmp_path):
	work = _train(tdmpc2_root, tmp_path, "task=gym:Walker2d-v4", "episodic=true", "steps=300", "seed_steps=150")
	assert (work / "models" / "final.pt").is_file()


def test_a_multitask_agent_over_two_gymnasium_tasks_of_different_shapes_trains_online_and_plays(tdmpc2_root, tmp_path):
	# Pendulum: 3 observation dims, 1 action (+-2, rescaled); Reacher: 11 and 2. Upstream pads to the largest.
	tasks = "tasks=[gym:Pendulum-v1,gym:Reacher-v4]"
	work = _train(tdmpc2_root, tmp_path, "task=pendulum-reacher", tasks, "steps=400", "seed_steps=250",
				  "checkpoint_interval=0")
	assert work == tmp_path / "logs" / "pendulum-reacher" / "1" / "default"
	config = (work / "config.yaml").read_text()
	assert "- gym:Pendulum-v1" in config and "- gym:Reacher-v4" in config
	import torch
	model = torch.load(work / "models" / "final.pt", weights_only=True)["model"]
	assert model["_task_emb.weight"].shape[0] == 2 and model["_action_masks"].tolist() == [[1.0, 0.0], [1.0, 1.0]]
	out, stdout = _play(tdmpc2_root, tmp_path, work, "task=pendulum-reacher", tasks)
	assert "task gym:Pendulum-v1: 1 episode(s), 20 steps" in stdout and "task gym:Reacher-v4: 1 episode(s), 20 steps" in stdout
	assert (out / "tasks_experts.png").is_file()
	assert "| gym:Reacher-v4 | 20 |" in (out / "summary.md").read_text()


def test_myosuite_trains_and_plays_through_upstreams_own_code(tdmpc2_root, tmp_path):
	why = upstream_families.MYOSUITE.missing()
	if why:
		pytest.skip(why)
	work = _train(tdmpc2_root, tmp_path, "task=myo-key-turn-hard", "steps=250", "seed_steps=100")
	out, stdout = _play(tdmpc2_root, tmp_path, work, "task=myo-key-turn-hard")
	assert "task myo-key-turn-hard: 1 episode(s), 20 steps" in stdout
	assert (out / "weight_stats.npz").is_file()


@pytest.fixture(scope="module")
def humanoid_bench_installed():
	"""Skips without a HumanoidBench source tree ($HUMANOID_BENCH_ROOT or ~/humanoid-bench); fails when one is there but does not import."""
	root = os.environ.get(HUMANOID_BENCH_ENV) or str(Path.home() / "humanoid-bench")
	if not Path(root, "humanoid_bench", "__init__.py").is_file():
		pytest.skip(f"set {HUMANOID_BENCH_ENV} to a HumanoidBench source tree (github.com/carlosferrazza/humanoid-bench; "
					"scripts/test.sh finds ~/humanoid-bench and installs it)")
	why = humanoid_bench.missing()
	assert why is None, f"a HumanoidBench source tree is at {root}, but: {why}"


def test_humanoid_bench_trains_plays_and_renders(tdmpc2_root, tmp_path, humanoid_bench_installed):
	work = _train(tdmpc2_root, tmp_path, "task=humanoid_h1hand-run-v0", "steps=250", "seed_steps=100")
	assert work == tmp_path / "logs" / "humanoid_h1hand-run-v0" / "1" / "default"
	out, stdout = _play(tdmpc2_root, tmp_path, work, "task=humanoid_h1hand-run-v0", video=True)
	assert "video: " in stdout, stdout
	import imageio.v3 as iio
	frames = iio.imread(out / "video.mp4")
	assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.std() > 1  # frames of a scene, not blank


BAD = [
	(["task=walker-wlak"], "unknown task 'walker-wlak': no task family has it", "closest: walker-walk"),
	(["task=gym:Walker2d-v9"], "no Gymnasium environment 'Walker2d-v9' is registered", "closest: Walker2d-v4"),
	(["task=gym:CartPole-v1"], "task=gym:CartPole-v1 has Discrete actions", None),
	(["task=gym:Walker2d-v4"], "terminate_when_unhealthy): train it with episodic=true", None),
	(["task=gym:Pendulum-v1", "env_module=no_such_lab.envs"], "env_module=no_such_lab.envs: cannot import it", None),
	(["task=gym:Pendulum-v1", "obs=rgb"], "supports obs=state only", None),
	(["task=pair", "tasks=[gym:Pendulum-v1]", "checkpoint_interval=0"], "tasks must name two or more different tasks", None),
	(["task=pair", "tasks=[gym:Pendulum-v1,gym:Nope-v0]", "checkpoint_interval=0"],
	 "no Gymnasium environment 'Nope-v0' is registered", None),
	(["task=mw-reach"], "task=mw-reach: Meta-World is not installed", None),
]


@pytest.mark.parametrize("keys, expected, also", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_a_task_that_cannot_run_is_one_line_and_exit_1_before_any_step(tdmpc2_root, tmp_path, monkeypatch, capsys, unpatched,
																		 keys, expected, also):
	monkeypatch.chdir(tmp_path)
	code = cli_main(["train", "--tdmpc2", str(tdmpc2_root), *RUN, *keys])
	err = capsys.readouterr().err
	assert code == 1, err
	assert err.count("\n") == 1 and "Traceback" not in err and expected in err, err
	assert also is None or also in err, err
	assert list(tmp_path.iterdir()) == []


def test_humanoid_bench_unknown_id_lists_its_closest(tdmpc2_root, tmp_path, monkeypatch, capsys, unpatched, humanoid_bench_installed):
	monkeypatch.chdir(tmp_path)
	assert cli_main(["train", "--tdmpc2", str(tdmpc2_root), *RUN, "task=humanoid_h1hand-runn-v0"]) == 1
	err = capsys.readouterr().err
	assert "HumanoidBench has no environment 'h1hand-runn-v0'; closest: h1hand-run-v0" in err and err.count("\n") == 1
	assert list(tmp_path.iterdir()) == []


def test_upstreams_dmc_and_mujoco_names_are_their_families(tdmpc2_root):
	from tdmpc2_moe.families.registry import family_of
	assert family_of("walker-walk").name == "DMC" and family_of("cup-catch").name == "DMC"
	assert family_of("mujoco-halfcheetah").name == "Gymnasium MuJoCo"
	assert family_of("walker-wlak") is None
