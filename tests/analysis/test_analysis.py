"""Gate-weight statistics on hand-made arrays, the weight_stats.npz round trip and `tdmpc2-moe analyze`."""
import math
import os

import numpy as np
import pytest

from tdmpc2_moe.analysis import gate_stats as analysis
from tdmpc2_moe.cli import main as cli_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _h(p):
	return -sum(x * math.log(x) for x in p if x > 0)


def test_statistics_of_hand_made_weights():
	w = np.array([[1.0, 0.0], [0.8, 0.2], [0.5, 0.5], [0.2, 0.8]], dtype=np.float32)
	s = analysis.weight_statistics(w)
	# The tie in row 2 goes to the lower index, as in the gate.
	np.testing.assert_allclose(s["usage"], [0.75, 0.25])
	np.testing.assert_allclose(s["dominant"], [0.5, 0.25])
	assert s["balanced"] == pytest.approx(0.25)
	expected_entropy = [0.0, _h([0.8, 0.2]), math.log(2), _h([0.2, 0.8])]
	np.testing.assert_allclose(s["entropy"], expected_entropy, rtol=1e-6)
	assert s["mean_entropy"] == pytest.approx(np.mean(expected_entropy), rel=1e-6)
	np.testing.assert_allclose(s["mean"], [0.625, 0.375], rtol=1e-6)
	np.testing.assert_allclose(s["std"], np.std(w.astype(np.float64), axis=0), rtol=1e-6)
	assert s["collapsed"].tolist() == []


def test_collapse_warning_below_a_quarter_of_fair_share():
	e, t = 4, 16
	w = np.zeros((t, e), dtype=np.float32)
	w[:, 0] = 1.0
	w[:5, 0], w[:5, 1] = 0.0, 1.0
	w[5:10, 0], w[5:10, 2] = 0.0, 1.0
	w[10, 0], w[10, 3] = 0.0, 1.0  # expert 3 wins 1 of 16 steps: exactly 1/(4E), not under it
	s = analysis.weight_statistics(w)
	np.testing.assert_allclose(s["usage"], [5 / 16, 5 / 16, 5 / 16, 1 / 16])
	assert s["collapsed"].tolist() == []
	assert "WARNING" not in analysis.summary_table({"reward": {"weights": w}})
	w[10, 3], w[10, 0] = 0.0, 1.0
	s = analysis.weight_statistics(w)
	assert s["collapsed"].tolist() == [3]
	table = analysis.summary_table({"reward": {"weights": w}})
	assert "WARNING: expert collapse in reward: expert 3" in table


def test_statistics_reject_bad_weights():
	with pytest.raises(ValueError, match="weights"):
		analysis.weight_statistics(np.zeros(4))
	with pytest.raises(ValueError, match="weights"):
		analysis.weight_statistics(np.array([[np.nan, 1.0]]))


def _per_head(t=40, e=4, seed=0):
	rng = np.random.default_rng(seed)
	per_head = {}
	for head in ("dynamics", "pi"):
		logits = rng.normal(size=(t, e))
		top = np.argsort(-logits, axis=1)[:, :2]
		w = np.zeros((t, e), dtype=np.float32)
		p = np.exp(np.take_along_axis(logits, top, 1))
		np.put_along_axis(w, top, (p / p.sum(1, keepdims=True)).astype(np.float32), 1)
		per_head[head] = {"weights": w}
	per_head["dynamics"]["plan_weights"] = np.full((t, e), 1.0 / e, dtype=np.float32)
	per_head["dynamics"]["plan_entropy"] = np.full(t, 0.6, dtype=np.float32)
	return per_head


def test_weight_stats_round_trip(tmp_path):
	per_head = _per_head()
	path = analysis.save_weight_stats(str(tmp_path / "weight_stats.npz"), per_head, [25, 15])
	loaded, lengths, dominance = analysis.load_weight_stats(path)
	assert list(loaded) == ["dynamics", "pi"]
	assert lengths.tolist() == [25, 15] and dominance == 0.7
	for head, data in per_head.items():
		np.testing.assert_array_equal(loaded[head]["weights"], data["weights"])
		s = analysis.weight_statistics(data["weights"])
		for key in ("entropy", "usage", "mean", "std", "dominant", "balanced"):
			np.testing.assert_allclose(loaded[head][key], s[key])
	np.testing.assert_array_equal(loaded["dynamics"]["plan_weights"], per_head["dynamics"]["plan_weights"])
	assert "plan_weights" not in loaded["pi"]
	assert analysis.summary_table(loaded) == analysis.summary_table(per_head)


def test_save_rejects_length_mismatch(tmp_path):
	with pytest.raises(ValueError, match="episode_lengths"):
		analysis.save_weight_stats(str(tmp_path / "w.npz"), _per_head(t=40), [30])


def test_analyze_reproduces_table_and_plots(tmp_path, capsys):
	per_head = _per_head()
	analysis.save_weight_stats(str(tmp_path / "weight_stats.npz"), per_head, [40])
	out = tmp_path / "report"
	assert cli_main(["analyze", str(tmp_path / "weight_stats.npz"), "--out", str(out)]) == 0
	printed = capsys.readouterr().out
	expected = analysis.summary_table(per_head)
	assert printed.strip() == expected.strip()
	assert (out / "summary.md").read_text().strip() == expected.strip()
	for head in per_head:
		with open(out / f"gates_{head}.png", "rb") as f:
			assert f.read(8) == PNG_MAGIC
	# Without --out the report lands next to the file.
	assert cli_main(["analyze", str(tmp_path / "weight_stats.npz")]) == 0
	assert os.path.isfile(tmp_path / "summary.md")


@pytest.mark.parametrize("case", ["missing", "not_npz", "other_npz"])
def test_analyze_bad_file_is_one_line_error(tmp_path, capsys, case):
	path = tmp_path / "weight_stats.npz"
	if case == "not_npz":
		path.write_bytes(b"this is not a zip archive")
	elif case == "other_npz":
		np.savez(path, x=np.zeros(3))
	assert cli_main(["analyze", str(path)]) == 1
	err = capsys.readouterr().err
	assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err


def test_analyze_unwritable_out_is_one_line_error(tmp_path, capsys):
	analysis.save_weight_stats(str(tmp_path / "weight_stats.npz"), _per_head(), [40])
	blocker = tmp_path / "a_file"
	blocker.write_text("x")
	assert cli_main(["analyze", str(tmp_path / "weight_stats.npz"), "--out", str(blocker / "sub")]) == 1
	err = capsys.readouterr().err
	assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err


def _two_tasks():
	"""Hand-made weights of 3 episodes over tasks ["run", "walk"]: episodes (run 2 steps, walk 3, run 1)."""
	w = np.array([[1.0, 0.0], [0.6, 0.4],  # run
				  [0.0, 1.0], [0.5, 0.5], [0.2, 0.8],  # walk
				  [0.8, 0.2]], dtype=np.float32)  # run
	return {"reward": {"weights": w}}, [2, 3, 1], (["run", "walk"], [0, 1, 0])


def test_task_statistics_of_hand_made_weights():
	per_head, lengths, (names, episode_tasks) = _two_tasks()
	s = analysis.task_statistics(per_head["reward"]["weights"], lengths, episode_tasks, 2)
	assert s["steps"].tolist() == [3, 3]
	np.testing.assert_allclose(s["mean"], [[0.8, 0.2], [0.7 / 3, 2.3 / 3]], rtol=1e-6)
	# The tie at [0.5, 0.5] goes to the lower index, as in the gate.
	np.testing.assert_allclose(s["usage"], [[1.0, 0.0], [1 / 3, 2 / 3]])
	np.testing.assert_allclose(s["entropy"], [(_h([0.6, 0.4]) + _h([0.8, 0.2])) / 3,
											  (math.log(2) + _h([0.2, 0.8])) / 3], rtol=1e-6)
	table = analysis.task_table(per_head, lengths, (names, episode_tasks))
	assert "| run | 3 | 0.800 | 0.200 | 0 |" in table and "| walk | 3 | 0.233 | 0.767 | 1 |" in table


def test_multitask_weight_stats_extend_the_single_task_layout(tmp_path):
	per_head, lengths, tasks = _two_tasks()
	path = analysis.save_weight_stats(str(tmp_path / "weight_stats.npz"), per_head, lengths, tasks=tasks)
	loaded, loaded_lengths, _ = analysis.load_weight_stats(path)  # the single-task reader still reads it
	np.testing.assert_array_equal(loaded["reward"]["weights"], per_head["reward"]["weights"])
	assert loaded_lengths.tolist() == lengths
	names, episode_tasks = analysis.load_tasks(path)
	assert names == ["run", "walk"] and episode_tasks.tolist() == [0, 1, 0]
	np.testing.assert_allclose(loaded["reward"]["task_mean"], [[0.8, 0.2], [0.7 / 3, 2.3 / 3]], rtol=1e-6)
	single = analysis.save_weight_stats(str(tmp_path / "single.npz"), per_head, lengths)
	assert analysis.load_tasks(single) is None


@pytest.mark.parametrize("tasks", [(["run"], [0, 1, 0]), (["run", "walk"], [0, 0]), (["run", "walk"], [0, 0, 0]),
								   (["run", "walk"], [0.0, 1.0, 0.0]), "run"])
def test_bad_tasks_raise_naming_tasks(tmp_path, tasks):
	per_head, lengths, _ = _two_tasks()
	with pytest.raises(ValueError, match="tasks"):
		analysis.save_weight_stats(str(tmp_path / "w.npz"), per_head, lengths, tasks=tasks)


def test_analyze_reproduces_the_task_table_and_heatmap(tmp_path, capsys):
	per_head, lengths, tasks = _two_tasks()
	analysis.save_weight_stats(str(tmp_path / "weight_stats.npz"), per_head, lengths, tasks=tasks)
	out = tmp_path / "report"
	assert cli_main(["analyze", str(tmp_path / "weight_stats.npz"), "--out", str(out)]) == 0
	expected = analysis.summary_table(per_head) + "\n" + analysis.task_table(per_head, lengths, tasks)
	assert capsys.readouterr().out.strip() == expected.strip()
	assert (out / "summary.md").read_text().strip() == expected.strip()
	with open(out / "tasks_experts.png", "rb") as f:
		assert f.read(8) == PNG_MAGIC


def test_compare_plots_tasks_whose_names_hold_a_path(tmp_path):
	# Gymnasium ids hold ':' and '/' (gym:ALE/Pong-v5): the plot's file name must not make a directory of them.
	from tdmpc2_moe.analysis import compare
	for task in ("gym:ALE/Pong-v5", "walker-walk"):
		run = tmp_path / "logs" / task / "1" / "default"
		run.mkdir(parents=True)
		(run / "eval.csv").write_text("step,episode_reward\n0,1.0\n100,2.0\n")
		(run / "config.yaml").write_text(f"task: {task}\nseed: 1\nsteps: 100\neval_freq: 100\nexp_name: default\n")
	lines = compare.compare([tmp_path / "logs"], tmp_path / "out")
	assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["gym_ALE_Pong-v5.png", "walker-walk.png"]
	assert lines[-1].endswith("gym_ALE_Pong-v5.png, walker-walk.png")
