"""Gate snapshots during training (gate_snapshot_interval) and `tdmpc2-moe analyze DIR`."""
import os

import numpy as np
import torch

from tdmpc2_moe.cli import main as cli_main
from tdmpc2_moe.analysis.gate_snapshots import (SNAPSHOT_ROWS, GateSnapshots, _routes_densely, load_snapshots,
									   training_table)
from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.block.routing_stats import summarize


def _blocks():
	torch.manual_seed(0)
	return {"dynamics": MoEBlock(6, [16], 5, n_experts=4, top_k=2, history_rows=3000),
			"reward": MoEBlock(6, [16], 3, n_experts=3, top_k=1, history_rows=50)}


def test_snapshots_appear_at_the_interval_with_the_rings_contents(tmp_path):
	blocks = _blocks()
	snapshots = GateSnapshots(3, tmp_path / "gates")
	expected = {}
	for update in range(1, 8):
		for block in blocks.values():
			block(torch.randn(700, 6))
		snapshots.step(blocks)
		if update % 3 == 0:
			expected[update] = {h: b.history.snapshot().numpy() for h, b in blocks.items()}
	snapshots.wait()
	names = sorted(os.listdir(tmp_path / "gates"))
	assert names == ["step_3.npz", "step_3.png", "step_6.npz", "step_6.png"]
	loaded = dict(load_snapshots(str(tmp_path)))
	assert sorted(loaded) == [3, 6]
	for step, rings in expected.items():
		for head, ring in rings.items():
			a = loaded[step][head]
			np.testing.assert_array_equal(a["weights"], ring[-SNAPSHOT_ROWS:])
			expected_stats = summarize(torch.from_numpy(ring))
			for key in ("usage", "mean_weight", "entropy"):
				np.testing.assert_allclose(a[key], expected_stats[key].numpy())
			assert int(a["rows"]) == min(700 * step, blocks[head].history.capacity)
			assert float(a["temperature"]) == 1.0


def test_analyze_dir_reproduces_its_table_and_plot_from_the_files(tmp_path, capsys):
	blocks = _blocks()
	snapshots = GateSnapshots(2, tmp_path / "run" / "gates")
	for _ in range(6):
		for block in blocks.values():
			block(torch.randn(64, 6))
		snapshots.step(blocks)
	snapshots.wait()
	out = tmp_path / "report"
	assert cli_main(["analyze", str(tmp_path / "run"), "--out", str(out)]) == 0
	table = (out / "routing_over_training.md").read_text()
	assert table.strip() == training_table(load_snapshots(str(tmp_path / "run"))).strip()
	assert table.count("| dynamics |") == 3 and (out / "routing_over_training.png").stat().st_size > 10_000
	assert table in capsys.readouterr().out + "\n"


def test_dense_heads_are_told_apart_and_the_table_has_the_weight_share(tmp_path):
	# A dense head (top_k == E, the fork preset) uses every expert on every row: its usage is 1/E by
	# construction, so the plot shows its weight share; the table has both for every head.
	torch.manual_seed(0)
	blocks = {"dynamics": MoEBlock(6, [16], 5, n_experts=4, top_k=4, history_rows=500),
			  "reward": MoEBlock(6, [16], 3, n_experts=4, top_k=2, history_rows=500)}
	snapshots = GateSnapshots(1, tmp_path / "gates")
	for block in blocks.values():
		block(torch.randn(100, 6))
	snapshots.step(blocks)
	snapshots.wait()
	(step, heads), = load_snapshots(str(tmp_path))
	assert _routes_densely(heads["dynamics"]) and not _routes_densely(heads["reward"])
	np.testing.assert_allclose(heads["dynamics"]["usage"], 0.25)
	row = next(line for line in training_table([(step, heads)]).splitlines() if "| dynamics |" in line)
	weights = [float(w) for w in row.split("|")[6].split()]
	np.testing.assert_allclose(weights, heads["dynamics"]["mean_weight"], atol=5e-4)
	assert abs(sum(weights) - 1) < 2e-3


def test_analyze_dir_without_snapshots_says_so(tmp_path, capsys):
	assert cli_main(["analyze", str(tmp_path)]) == 1
	assert "gate_snapshot_interval" in capsys.readouterr().err


def test_patched_agent_writes_snapshots_into_its_work_dir(walker_cfg, make_buffer, tmp_path):
	from tdmpc2 import TDMPC2
	cfg = walker_cfg("use_moe=true", "gate_snapshot_interval=5", "gate_history_rows=4096")
	cfg.work_dir = tmp_path
	agent = TDMPC2(cfg)
	buffer = make_buffer(cfg)
	for _ in range(11):
		agent.update(buffer)
	agent.gate_snapshots.wait()
	loaded = load_snapshots(str(tmp_path))
	assert [step for step, _ in loaded] == [5, 10]
	assert set(loaded[-1][1]) == {"dynamics", "reward", "pi"}
	assert int(loaded[-1][1]["pi"]["rows"]) > 0
	plain = TDMPC2(walker_cfg("gate_snapshot_interval=5"))
	assert plain.gate_snapshots is None


def test_history_snapshot_is_a_copy_that_later_forwards_do_not_change():
	from tdmpc2_moe import GateHistory, topk_gate
	history = GateHistory(8, 3)
	topk_gate(torch.randn(3, 3), 1, history=history)
	snap = history.snapshot()
	kept = snap.clone()
	topk_gate(torch.randn(5, 3), 2, history=history)
	torch.testing.assert_close(snap, kept, rtol=0, atol=0)
