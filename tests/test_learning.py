"""
The learning benchmark (benchmarks/learning/): its results CSV (upstream's `step,reward,seed`), the
resume rule (a finished run is not redone), a real `tdmpc2-moe train` run on a tiny budget, the skip
of a variant whose setting is unknown, the plot/table report, and the world-model fit benchmark on a
tiny budget. Parts that train need a TD-MPC2 checkout ($TDMPC2_ROOT) and are skipped without one.
"""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "learning"))
import learning  # noqa: E402
import report  # noqa: E402
import mt_fit  # noqa: E402
import wm_fit  # noqa: E402

# One 500-step episode of cartpole-balance (evaluations happen at episode ends, and upstream's buffer
# holds nothing to train on before the first episode ends, so seed_steps is at least its length),
# planning and batches cut down so that a run takes well under a minute.
TINY = ["model_size=1", "device=cpu", "compile=false", "seed_steps=500", "batch_size=16", "num_samples=16",
		"num_elites=4", "num_pi_trajs=2", "iterations=1", "eval_episodes=1", "enable_wandb=false",
		"save_video=false", "save_agent=false", "monitor_mem_interval=0"]


def _run(tmp_path, variant="plain", steps=500, settings=TINY):
	return learning.Run(tmp_path, "cartpole-balance", variant, 1, steps, 500, "/nonexistent", settings)


def test_results_csv_is_upstreams_format(tmp_path):
	path = tmp_path / "r" / "seed3.csv"
	learning.write_results(path, [(0, 12.345), (500, 600.0)], seed=3)
	assert path.read_text().splitlines() == ["step,reward,seed", "0,12.3,3", "500,600.0,3"]
	assert learning.read_results(path) == [(0, 12.3, 3), (500, 600.0, 3)]
	# Upstream's own per-task results files read the same way.
	path.write_text("step,reward,seed\n0,270.6,3\n100000,998.4,3\n")
	assert learning.read_results(path)[-1] == (100000, 998.4, 3)


def test_results_csv_bad_input(tmp_path):
	with pytest.raises(ValueError, match="evals"):
		learning.write_results(tmp_path / "x.csv", [], seed=1)
	bad = tmp_path / "eval.csv"
	bad.write_text("step,episode_reward\n0,1.0\n")
	with pytest.raises(ValueError, match="step,reward,seed"):
		learning.read_results(bad)
	with pytest.raises(ValueError, match="variants"):
		learning.plan(tmp_path, ["cartpole-balance"], [1], ["plain", "nope"], 500, 500, "/x")


def test_runs_launch_seed_by_seed_so_every_task_gets_its_first_seed_first(tmp_path):
	runs = learning.plan(tmp_path, ["cartpole-balance", "walker-stand"], [1, 2], ["plain", "moe"], 500, 500, "/x")
	assert [(r.seed, r.task, r.variant) for r in runs] == [
		(1, "cartpole-balance", "plain"), (1, "cartpole-balance", "moe"), (1, "walker-stand", "plain"),
		(1, "walker-stand", "moe"), (2, "cartpole-balance", "plain"), (2, "cartpole-balance", "moe"),
		(2, "walker-stand", "plain"), (2, "walker-stand", "moe")]


def test_moe_variants_take_gate_snapshots_plain_does_not():
	assert not any(o.startswith("gate_snapshot_interval") for o in learning.VARIANTS["plain"])
	for variant in ("moe", "fork"):
		assert f"gate_snapshot_interval={learning.GATE_SNAPSHOT_EVERY}" in learning.VARIANTS[variant]


def test_rss_growth_counts_from_the_first_evaluation_after_pretraining():
	# (seconds, last evaluated step, MB): the buffer and optimiser fill up during the seed steps.
	samples = [(2, -1, 200.0), (4, 0, 400.0), (6, 1000, 480.0), (8, 1500, 500.0), (10, 2000, 507.5), (12, 2000, 0.0)]
	assert learning.rss_growth(samples, eval_freq=500, seed_steps=1000) == 7.5, "0 MB: read while exiting"
	assert learning.rss_growth(samples[:4], eval_freq=500, seed_steps=1000) is None


def _finish_by_hand(run, evals):
	learning.write_results(run.csv, evals, run.seed)
	run.meta.write_text(json.dumps(dict(overrides=run.overrides())))


def test_complete_only_for_a_finished_run_of_the_same_command(tmp_path):
	run = _run(tmp_path)
	assert not run.complete()
	_finish_by_hand(run, [(0, 10.0)])
	assert not run.complete(), "a run that stopped before its last step is not complete"
	_finish_by_hand(run, [(0, 10.0), (500, 20.0)])
	assert run.complete()
	assert not _run(tmp_path, steps=1000).complete(), "another budget is another run"
	assert not _run(tmp_path, settings=TINY + ["lr=1e-3"]).complete(), "other settings are another run"
	run.csv.write_text("garbage\n")
	assert not run.complete()


def test_complete_runs_are_not_started_again(tmp_path):
	run = _run(tmp_path)
	_finish_by_hand(run, [(0, 10.0), (500, 20.0)])
	lines = []
	status = learning.run_all([run], jobs=1, poll_s=0.1, echo=lines.append)
	assert status == {run.name: "complete"}
	assert not run.work.exists(), "nothing was launched"


def test_report_plot_and_table(tmp_path):
	for seed, rewards in ((1, (100.0, 300.0, 500.0)), (2, (200.0, 500.0, 700.0))):
		for variant, scale in (("plain", 1.0), ("moe", 0.5)):
			run = learning.Run(tmp_path, "cartpole-balance", variant, seed, 1000, 500, "/x")
			learning.write_results(run.csv, [(0, rewards[0] * scale), (500, rewards[1] * scale),
											  (1000, rewards[2] * scale)], seed)
			run.meta.write_text(json.dumps(dict(overrides=run.overrides(), wall_s=120.0, rss_growth_mb=3.0)))
	learning.write_results(tmp_path / "results" / "cartpole-balance" / "moe" / "seed3.partial.csv", [(0, 1.0)], 3)
	text = report.report(tmp_path, at=[500, 1000])
	assert (tmp_path / "learning.png").stat().st_size > 1000
	rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| cartpole")}
	assert "| 400 (300 / 500) | 600 (500 / 700) |" in rows["plain"]
	assert "| 200 (150 / 250) | 300 (250 / 350) |" in rows["moe"]
	assert "| 2 / 2 | +3 / +3 |" in rows["plain"]
	assert "| cartpole-balance | moe, unfinished (to step 0) | 3 |" in text


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
def test_tiny_training_run_then_resume(tdmpc2_root, tmp_path):
	run = learning.Run(tmp_path, "cartpole-balance", "plain", 1, 500, 500, tdmpc2_root, TINY)
	lines = []
	status = learning.run_all([run], jobs=1, poll_s=5.0, echo=lines.append)
	assert status == {run.name: "done"}, run.log_tail(20)
	rows = learning.read_results(run.csv)
	assert [s for s, _, _ in rows] == [0, 500] and all(seed == 1 for _, _, seed in rows)
	assert all(0.0 <= r <= 1000.0 for _, r, _ in rows)
	meta = json.loads(run.meta.read_text())
	assert meta["overrides"] == run.overrides() and meta["wall_s"] > 0 and meta["rss"]
	assert any(line.startswith(f"[{run.name}] started:") for line in lines)
	stamp = run.csv.stat().st_mtime_ns
	again = learning.run_all([learning.Run(tmp_path, "cartpole-balance", "plain", 1, 500, 500, tdmpc2_root, TINY)],
							 jobs=1, poll_s=5.0, echo=lines.append)
	assert again == {run.name: "complete"} and run.csv.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_tiny_moe_run_saves_its_routing_over_training(tdmpc2_root, tmp_path):
	# 500 pretraining updates with snapshots every GATE_SNAPSHOT_EVERY (250): snapshots at updates 250 and 500.
	run = learning.Run(tmp_path, "cartpole-balance", "moe", 1, 500, 500, tdmpc2_root, TINY)
	status = learning.run_all([run], jobs=1, poll_s=5.0, echo=lambda line: None)
	assert status == {run.name: "done"}, run.log_tail(20)
	table = run.routing_png.with_suffix(".md").read_text().splitlines()
	assert run.routing_png.stat().st_size > 10_000
	updates = sorted({int(line.split("|")[1]) for line in table[2:]})
	assert updates == [250, 500], table
	assert {line.split("|")[2].strip() for line in table[2:]} == {"dynamics", "reward", "pi"}
	assert learning.Run(tmp_path, "cartpole-balance", "plain", 1, 500, 500, tdmpc2_root, TINY).save_routing() is None


def test_unknown_setting_skips_the_variant(tdmpc2_root, tmp_path, monkeypatch):
	monkeypatch.setitem(learning.VARIANTS, "future", ["moe_not_yet_a_setting=1", "use_moe=true"])
	runs = [learning.Run(tmp_path, "cartpole-balance", "future", seed, 500, 500, tdmpc2_root, TINY) for seed in (1, 2)]
	status = learning.run_all(runs, jobs=1, poll_s=1.0, echo=lambda line: None)
	assert all(s.startswith("skipped: this tdmpc2_moe does not know moe_not_yet_a_setting=1") for s in status.values())
	assert not runs[0].csv.exists() and not runs[1].work.exists(), "the second seed is not launched"


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
