"""
The learning benchmark (benchmarks/learning/): its sweep script runs exactly the settings of the
committed results (runs the sweep made), `compare` over them gives the committed table, the runs
made again (rerun/) repeat their committed runs' returns to the bit, the measured timings' table, no
import circle among the benchmark scripts, and the world-model fits on a tiny budget. Parts that build agents need a TD-MPC2 checkout ($TDMPC2_ROOT) and are skipped without one.
"""
import ast
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from tdmpc2_moe.analysis import compare
from tdmpc2_moe.runs import sweep
from tdmpc2_moe.cli import compare as compare_cli

LEARNING = REPO / "benchmarks" / "learning"
RESULTS = LEARNING / "results"
sys.path.insert(0, str(LEARNING))
import measure  # noqa: E402
import mt_fit  # noqa: E402
import variants  # noqa: E402
import wm_fit  # noqa: E402

# The table compare gives for the committed results (benchmarks/learning/README.md names the command).
COMPARE_ARGS = [str(RESULTS), "--by", "exp_name", "--at", "0", "1000", "2000", "3000", "4000"]


def _committed_runs(root=RESULTS):
	"""Returns {(task, seed, variant): whole composed config dict} of the runs under root."""
	runs = {}
	for path in sorted(root.glob("*/*/*/config.yaml")):
		config = OmegaConf.to_container(OmegaConf.load(path))
		runs[(config["task"], config["seed"], config["exp_name"])] = config
	return runs


def _sweep_script(tmp_path, *args, fail=None, **env):
	"""
	Runs sweep.sh with a stand-in for tdmpc2-moe that records its arguments and thread settings (and
	fails when `fail` is among its arguments); returns (process, [argv of each call]).
	"""
	fake = tmp_path / "fake-tdmpc2-moe"
	calls = tmp_path / "calls.jsonl"
	fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
					f"threads = [os.environ.get(k) for k in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS')]\n"
					f"open({str(calls)!r}, 'a').write(json.dumps([threads, sys.argv[1:]]) + '\\n')\n"
					f"sys.exit(1 if {fail!r} in sys.argv else 0)\n")
	fake.chmod(0o755)
	environ = {k: v for k, v in os.environ.items() if k not in ("TASKS", "SEEDS", "LAUNCHER", "EXTRA")}
	done = subprocess.run(["bash", str(LEARNING / "sweep.sh"), *args], cwd=tmp_path, capture_output=True, text=True,
						  env=dict(environ, TDMPC2_ROOT="/the/checkout", TDMPC2_MOE=str(fake), MKL_NUM_THREADS="8", **env),
						  timeout=60)
	recorded = [json.loads(line) for line in calls.read_text().splitlines()] if calls.is_file() else []
	assert all(threads == ["1", "1"] for threads, _ in recorded), "one torch thread per run, whatever the caller set"
	return done, [argv for _, argv in recorded]


def test_sweep_script_trains_exactly_the_committed_runs(tmp_path):
	done, calls = _sweep_script(tmp_path)
	assert done.returncode == 0, done.stderr
	trains, last = calls[:-1], calls[-1]
	assert [c[:4] for c in trains] == [["train", "--tdmpc2", "/the/checkout", "-m"]] * 4
	committed, swept = _committed_runs(), {}
	for call in trains:
		jobs, launcher = sweep.expand(call[4:])
		assert launcher == ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
		for job in jobs:
			config = OmegaConf.to_container(OmegaConf.from_dotlist(job))
			swept[(config["task"], config["seed"], config["exp_name"])] = config
	assert len(committed) == 24 and swept.keys() == committed.keys()
	for run, config in swept.items():
		# A run's config.yaml is its whole composed config: every key the sweep passes has its value there.
		assert {k: committed[run][k] for k in config} == config, run
	assert last == ["compare", "logs", "--by", "exp_name", "--at", "0", "1000", "2000", "3000", "4000", "--out", "compare"]


def test_sweep_script_runs_the_variants_named_and_reports_a_failing_one(tmp_path):
	done, calls = _sweep_script(tmp_path, "plain", "moe", fail="exp_name=plain", SEEDS="7", TASKS="walker-walk",
								LAUNCHER="hydra/launcher=submitit_slurm hydra.launcher.partition=gpu",
								EXTRA="checkpoint_interval=1000 resume=true")
	assert done.returncode == 1, "the plain sweep failed"
	assert [c[0] for c in calls] == ["train", "train", "compare"], "moe and compare still ran"
	for call, name in zip(calls, ("plain", "moe")):
		assert f"exp_name={name}" in call and "seed=7" in call and "task=walker-walk" in call
		assert call[-4:] == ["checkpoint_interval=1000", "resume=true", "hydra/launcher=submitit_slurm",
							 "hydra.launcher.partition=gpu"]
	(tmp_path / "again").mkdir()
	done, calls = _sweep_script(tmp_path / "again", "plain", "nope")
	assert done.returncode == 2 and "unknown variant nope" in done.stderr and calls == [], "nothing ran"


def test_variants_are_the_settings_of_the_committed_runs():
	for (task, seed, name), config in _committed_runs().items():
		keys = [f"task={task}", f"seed={seed}", "steps=4000", "eval_freq=1000", f"exp_name={name}",
				*variants.COMMON, *variants.VARIANTS[name]]
		given = OmegaConf.to_container(OmegaConf.from_dotlist(keys))
		assert {k: config[k] for k in given} == given, (task, seed, name)


def test_moe_variants_take_gate_snapshots_plain_does_not():
	assert not any(o.startswith("gate_snapshot_interval") for o in variants.VARIANTS["plain"])
	for name in ("moe", "fork", "matched"):
		assert f"gate_snapshot_interval={variants.GATE_SNAPSHOT_EVERY}" in variants.VARIANTS[name]


def test_committed_runs_are_finished_runs_of_the_sweep():
	for path in sorted(RESULTS.glob("*/*/*/run.json")):
		info = json.loads(path.read_text())
		config = OmegaConf.to_container(OmegaConf.load(path.with_name("config.yaml")))
		assert {"horizon", "mpc", "task_dim", "buffer_size"} <= config.keys(), "upstream's whole composed config"
		assert info["status"] == "finished" and info["steps"] == config["steps"] and info["wall_s"] > 0
		with open(path.with_name("eval.csv")) as f:
			steps = [float(r["step"]) for r in csv.DictReader(f)]
		assert steps == list(range(0, config["steps"] + 1, config["eval_freq"])), path
		routing = path.with_name("routing_over_training.png").is_file()
		assert routing == config["use_moe"], "every MoE run (and only those) has its routing plot"


def test_the_runs_made_again_repeat_their_committed_runs():
	# rerun/ holds committed runs trained again later, alone, by `tdmpc2-moe train` without -m (README
	# "Runs made again"): the committed settings, and upstream's eval.csv identical to the last digit.
	reruns = _committed_runs(LEARNING / "rerun")
	committed = _committed_runs()
	assert {("cartpole-balance", 1, "plain"), ("walker-stand", 2, "moe")} <= reruns.keys()
	for (task, seed, name), config in reruns.items():
		before = committed[(task, seed, name)]
		# Keys added to the options record after the committed runs are the only ones they lack.
		assert {k: config[k] for k in before} == before, (task, seed, name)
		assert config.keys() - before.keys() <= {"sweep_threads", "sweep_gpus", "deterministic"}
		run = Path(task, str(seed), name, "eval.csv")
		assert (LEARNING / "rerun" / run).read_text() == (RESULTS / run).read_text(), run


def test_compare_over_the_committed_results_gives_the_committed_table(tmp_path, capsys):
	assert compare_cli.main([*COMPARE_ARGS, "--out", str(tmp_path)]) == 0
	assert capsys.readouterr().out.startswith(f"read 24 runs under {RESULTS}; variants by exp_name")
	for name in ("compare.md", "compare.csv"):
		assert (tmp_path / name).read_text() == (LEARNING / "compare" / name).read_text(), name
	for task in ("cartpole-balance", "walker-stand"):
		assert (tmp_path / f"{task}.png").read_bytes()[:4] == b"\x89PNG"
	# The tables the READMEs show are this table, row for row.
	rows = [line for line in (tmp_path / "compare.md").read_text().splitlines() if line.startswith("| exp_name=")]
	assert len(rows) == 8
	for readme in (LEARNING / "README.md", LEARNING.parent / "README.md"):
		text = readme.read_text()
		assert all(row in text for row in rows), readme


def test_measure_table_against_plain():
	found = {"walker-stand": {
		"plain": dict(ms_per_update=50.0, ms_per_act=20.0, wall_ms_per_update=55.0, wall_ms_per_act=21.0, backend="cpu"),
		"moe": dict(ms_per_update=80.0, ms_per_act=50.0, wall_ms_per_update=90.0, wall_ms_per_act=52.0, backend="cpu"),
		"fork": dict(skipped="this tdmpc2_moe does not know moe_preset=fork yet")}}
	rows = measure.table(found).splitlines()
	assert rows[2] == "| walker-stand | plain | 50.0 | 1.00x | 20.0 | 1.00x | 55.0 | 21.0 | cpu |"
	assert rows[3] == "| walker-stand | moe | 80.0 | 1.60x | 50.0 | 2.50x | 90.0 | 52.0 | cpu |"
	assert rows[4].startswith("| walker-stand | fork | skipped: this tdmpc2_moe does not know moe_preset=fork")


def test_no_import_circle_among_the_benchmark_scripts():
	benchmarks = LEARNING.parent
	for directory in {p.parent for p in benchmarks.rglob("*.py")}:
		local = {p.stem for p in directory.glob("*.py")}
		graph = {}
		for p in directory.glob("*.py"):
			names = set()
			for node in ast.walk(ast.parse(p.read_text())):
				if isinstance(node, ast.Import):
					names |= {a.name.split(".")[0] for a in node.names}
				elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
					names.add(node.module.split(".")[0])
			graph[p.stem] = names & local - {p.stem}

		def reaches(start, goal, seen=()):
			return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])
		assert not [m for m in graph if reaches(m, m)], f"import circle in {directory}: {graph}"


def test_windows_match_upstreams_batch_layout():
	import torch
	# Episode e, step t: obs = 1000 e + t; the action and reward of the transition t -> t+1 carry t too.
	n, steps = 3, 20
	t = torch.arange(steps + 1, dtype=torch.float32)
	obs = (1000 * torch.arange(n)[:, None] + t[None]).unsqueeze(-1).repeat(1, 1, 2)
	data = dict(obs=obs, action=obs[:, :-1, :1].clone(), reward=obs[:, :-1, 0].clone())
	o, a, r, term = wm_fit.windows(data, [0, 2], count=64, horizon=3, seed=0)
	assert o.shape == (4, 64, 2) and a.shape == (3, 64, 1) and r.shape == (3, 64, 1) and term.shape == (3, 64, 1)
	assert set((o[0, :, 0] // 1000).tolist()) <= {0, 2}
	assert torch.equal(o[1:] - o[:-1], torch.ones_like(o[1:])), "consecutive steps of one episode"
	assert torch.equal(a[..., 0], o[:-1, :, 0]) and torch.equal(r, a), "action t leads from obs t to obs t+1"
	assert not term.any()
	again = wm_fit.windows(data, [0, 2], count=64, horizon=3, seed=0)
	assert all(torch.equal(x, y) for x, y in zip((o, a, r), again))


# ---- with a TD-MPC2 checkout ----

@pytest.mark.slow
def test_sweep_script_end_to_end_on_a_tiny_budget(tdmpc2_root, tmp_path):
	# The real tdmpc2-moe: the plain variant's sweep with the budget cut down through EXTRA (a later
	# override wins), then compare over what it wrote.
	tiny = "steps=500 seed_steps=500 eval_freq=500 batch_size=4 mpc=false monitor_mem_interval=0"
	command = Path(sys.executable).with_name("tdmpc2-moe")
	assert command.is_file(), f"{command}: the installed command"
	env = dict(os.environ, TDMPC2_ROOT=str(tdmpc2_root), TDMPC2_MOE=str(command), TASKS="cartpole-balance", SEEDS="1",
			   EXTRA=tiny, LAUNCHER="hydra/launcher=joblib hydra.launcher.n_jobs=1")
	done = subprocess.run(["bash", str(LEARNING / "sweep.sh"), "plain"], cwd=tmp_path, capture_output=True, text=True,
						  env=env, timeout=600)
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	assert "tdmpc2-moe sweep: 1 of 1 jobs finished" in done.stdout
	assert "finished, return" in done.stderr, "the job's progress line"
	with open(tmp_path / "logs" / "cartpole-balance" / "1" / "plain" / "eval.csv") as f:
		assert [float(r["step"]) for r in csv.DictReader(f)] == [0.0, 500.0]
	assert "| exp_name=plain | 1 |" in (tmp_path / "compare" / "compare.md").read_text()
	assert (tmp_path / "compare" / "cartpole-balance.png").read_bytes()[:4] == b"\x89PNG"


def test_measure_times_a_variant_with_the_runs_settings(tdmpc2_root):
	m = measure.measure("cartpole-balance", "matched", tdmpc2_root, updates=2, acts=3, warmup=1)
	assert m["updates"] == 2 and m["acts"] == 3 and m["backend"] in ("cpu", "cuda", "reference")
	assert all(m[k] > 0 for k in ("ms_per_update", "ms_per_act", "wall_ms_per_update", "wall_ms_per_act"))


def test_world_model_fit_tiny(tdmpc2_root, tmp_path, unpatched):
	kwargs = dict(task="cartpole-balance", episodes=3, held_out=1, steps=40, updates=4, eval_every=2,
				  held_out_windows=32, seed=3, tdmpc2=tdmpc2_root, cache=tmp_path / "t.pt", echo=lambda line: None)
	result = wm_fit.benchmark(variants=("plain", "moe"), model_seeds=(1, 2), **kwargs)
	data = __import__("torch").load(tmp_path / "t.pt", weights_only=True)
	assert data["obs"].shape == (3, 41, 5) and data["action"].shape == (3, 40, 1)
	for name in ("plain", "moe"):
		r = result["variants"][name]
		for fit in r["seeds"].values():
			assert [p["update"] for p in fit["curve"]] == [0, 2, 4]
			assert all(math.isfinite(p[k]) and p[k] >= 0 for p in fit["curve"] for k in wm_fit.LOSSES)
			assert fit["ms_per_update"] > 0 and set(fit["train"]) == set(wm_fit.LOSSES)
		finals = [f["final"]["reward"] for f in r["seeds"].values()]
		assert r["final"]["reward"] == pytest.approx(sum(finals) / 2) and r["final_range"]["reward"] == [min(finals), max(finals)]
		assert finals[0] != finals[1], "model seeds give different fits"
	assert result["variants"]["plain"]["seeds"]["1"]["curve"] != result["variants"]["moe"]["seeds"]["1"]["curve"]
	# Deterministic: the same settings give the same losses (the recording comes from the cache).
	again = wm_fit.benchmark(variants=("plain",), model_seeds=(1,), **kwargs)
	assert again["variants"]["plain"]["seeds"]["1"]["curve"] == result["variants"]["plain"]["seeds"]["1"]["curve"]
	text = wm_fit.table(result)
	assert "| plain |" in text and "| moe |" in text and " to " in text
	wm_fit.plot(result, tmp_path / "fit.png")
	assert (tmp_path / "fit.png").stat().st_size > 1000


def test_world_model_fit_records_deterministically(tdmpc2_root, tmp_path):
	import torch
	a = wm_fit.record("cartpole-balance", 1, 20, 5, tdmpc2_root)
	b = wm_fit.record("cartpole-balance", 1, 20, 5, tdmpc2_root, cache=tmp_path / "c.pt")
	assert all(torch.equal(a[k], b[k]) for k in ("obs", "action", "reward"))
	assert a["action"].abs().max() <= 1 and a["reward"].min() >= 0


def test_multitask_fit_on_real_transitions_tiny(tdmpc2_root, tmp_path):
	# Two mt30 tasks recorded through upstream's environments, padded to mt30's layout; plain and the
	# compute-matched MoE fit on the same batches; held-out losses per task and overall.
	result = mt_fit.benchmark(tasks=("reacher-easy", "cartpole-swingup"), episodes=2, steps=20, updates=3,
							  held_out_windows=16, variants=("plain", "matched"), model_seeds=(1,),
							  tdmpc2=tdmpc2_root, cache_dir=tmp_path)
	assert list(result["variants"]) == ["plain", "matched"]
	for name, r in result["variants"].items():
		assert set(r["final"]) == {"reacher-easy", "cartpole-swingup", "overall"}
		for task, losses in r["final"].items():
			assert all(math.isfinite(losses[k]) and losses[k] >= 0 for k in mt_fit.LOSSES), (name, task)
		assert r["ms_per_update"] > 0
	text = mt_fit.table(result)
	assert "| overall | matched |" in text and "| reacher-easy | plain |" in text
	data = mt_fit.record_multitask(("reacher-easy", "cartpole-swingup"), 2, 20, 1, tdmpc2_root, tmp_path)
	assert data["obs"].shape == (2, 2, 21, 24) and data["action"].shape == (2, 2, 20, 6)
	assert data["action_dims"] == [2, 1] and data["index"].tolist() == [4, 10]
	# padding: past each task's own sizes the observations and actions are zero
	assert (data["obs"][0, ..., 6:] == 0).all() and (data["action"][1, ..., 1:] == 0).all()
