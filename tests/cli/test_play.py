"""`tdmpc2-moe play`: checkpoint loading, the device-side planner average, bad input, and a walker-walk run end to end."""
import os

import numpy as np
import pytest
import torch

from tdmpc2_moe.analysis import gate_stats as analysis
from tdmpc2_moe.cli import play
from tdmpc2_moe.cli import main as cli_main
from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.analysis.recording import GateRecorder
from tdmpc2_moe.ops.reference import dense_routing, topk_gate_reference

MOE_SETTINGS = dict(use_moe=True, moe_experts=4, moe_top_k=2, moe_heads=["dynamics", "reward", "pi"],
					moe_temperature=1.0, moe_aux_coef=0.01, moe_zloss_coef=0.0)
# Planning cut down so that a CPU episode stays short (upstream plans with 512 samples x 6 iterations).
SMALL_PLAN = ["num_samples=64", "num_elites=8", "num_pi_trajs=8", "iterations=2"]


def _one_line_error(capsys):
	err = capsys.readouterr().err
	assert err.count("\n") == 1 and "Traceback" not in err, err
	return err


def test_checkpoint_settings_become_overrides(tmp_path):
	path = tmp_path / "moe.pt"
	torch.save({"model": {}, "moe": dict(MOE_SETTINGS, moe_experts=8, moe_top_k=1, moe_heads=["pi"])}, path)
	_, overrides = play.load_checkpoint(str(path))
	# Architecture keys the settings lack (saved before they existed) rebuild with their defaults.
	assert overrides == ["use_moe=true", "moe_experts=8", "moe_top_k=1", "moe_heads=[pi]", "moe_temperature=1.0",
						 "moe_balance=switch", "moe_shared_head=false", "moe_orthogonal=false", "moe_gate_input=input",
						 "moe_last_norm=false", "moe_gate_offset=false", "moe_expert_dim=null"]


def test_moe_checkpoint_without_settings_is_read_from_its_gates(tmp_path):
	path = tmp_path / "bare.pt"
	torch.save({"model": {"_dynamics.gate.weight": torch.zeros(6, 10), "_pi.gate.weight": torch.zeros(6, 8),
						  "_Qs.params.0.weight": torch.zeros(2, 3)}}, path)
	_, overrides = play.load_checkpoint(str(path))
	assert overrides == ["use_moe=true", "moe_experts=6", "moe_heads=[dynamics,pi]"]


def test_missing_checkpoint_is_one_line_error(tmp_path, capsys):
	code = cli_main(["play", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")])
	assert code == 1
	assert "no such file" in _one_line_error(capsys)


def test_truncated_checkpoint_is_one_line_error(tmp_path, capsys):
	path = tmp_path / "cut.pt"
	torch.save({"model": {"_pi.gate.weight": torch.randn(4, 64)}, "moe": MOE_SETTINGS}, path)
	data = path.read_bytes()
	path.write_bytes(data[: len(data) // 2])
	assert cli_main(["play", "--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 1
	assert "not a readable PyTorch checkpoint" in _one_line_error(capsys)


def test_plain_checkpoint_is_one_line_error(tmp_path, capsys):
	path = tmp_path / "plain.pt"
	torch.save({"model": {"_pi.0.weight": torch.zeros(3, 3)}}, path)
	assert cli_main(["play", "--checkpoint", str(path), "--out", str(tmp_path / "out")]) == 1
	assert "no MoE heads" in _one_line_error(capsys)


def test_unwritable_out_is_one_line_error(tmp_path, capsys):
	path = tmp_path / "moe.pt"
	torch.save({"model": {}, "moe": MOE_SETTINGS}, path)
	blocker = tmp_path / "file"
	blocker.write_text("")
	assert cli_main(["play", "--checkpoint", str(path), "--out", str(blocker / "out")]) == 1
	assert "--out" in _one_line_error(capsys)


@pytest.mark.parametrize("rows", [3, 8, 11])
def test_planner_mean_covers_the_rows_written_during_act(rows):
	torch.manual_seed(0)
	block = MoEBlock(5, [7], 3, n_experts=4, top_k=2, history_rows=8)
	with torch.no_grad():
		block(torch.randn(6, 5))  # earlier rows, partly overwritten below: the ring wraps
		recorder = GateRecorder({"dynamics": block}, steps=2, device=torch.device("cpu"))
		recorder.before_act()
		x = torch.randn(rows, 5)
		block(x)
		recorder.after_act(1)
		gate = topk_gate_reference(block.gate(x), 2)
	dense = dense_routing(gate.weights, gate.indices, 4)[-8:]  # a ring of 8 keeps the last 8 rows
	torch.testing.assert_close(recorder.plan["dynamics"][1], dense.mean(0))
	w = dense.clamp(min=1e-12)
	torch.testing.assert_close(recorder.plan_entropy["dynamics"][1], -(dense * w.log()).sum(-1).mean())
	assert recorder.plan["dynamics"][0].abs().sum() == 0


def _train_and_save(walker_cfg, make_buffer, path):
	"""Builds a walker-walk MoE agent on the CPU, runs two updates on random episodes and saves it."""
	from tdmpc2 import TDMPC2
	from tdmpc2_moe.upstream import patching
	cfg = walker_cfg("use_moe=true")
	agent = TDMPC2(cfg)
	buffer = make_buffer(cfg)
	for _ in range(2):
		agent.update(buffer)
	agent.save(str(path))
	patching.unpatch()


def test_unknown_task_is_one_line_error(tdmpc2_root, tmp_path, capsys, unpatched):
	path = tmp_path / "moe.pt"
	torch.save({"model": {}, "moe": MOE_SETTINGS}, path)
	code = cli_main(["play", "--tdmpc2", str(tdmpc2_root), "--checkpoint", str(path), "--out", str(tmp_path / "out"),
					 "--device", "cpu", "task=walker-moonwalk", "model_size=1"])
	assert code == 1
	assert "unknown task 'walker-moonwalk'" in _one_line_error(capsys)


def test_play_walker_end_to_end(walker_cfg, make_buffer, tdmpc2_root, tmp_path, capsys):
	# walker_cfg also runs torch on one thread for the test: small CPU planning is much faster so.
	ckpt = tmp_path / "walker-moe.pt"
	_train_and_save(walker_cfg, make_buffer, ckpt)
	capsys.readouterr()
	out, steps = tmp_path / "play", 25
	code = cli_main(["play", "--tdmpc2", str(tdmpc2_root), "--checkpoint", str(ckpt), "--num-steps", str(steps),
					 "--seed", "3", "--device", "cpu", "--show-weights", "--record-video", "--out", str(out),
					 "task=walker-walk", "model_size=1", *SMALL_PLAN])
	printed = capsys.readouterr().out
	assert code == 0

	per_head, lengths, _ = analysis.load_weight_stats(str(out / "weight_stats.npz"))
	assert list(per_head) == ["dynamics", "reward", "pi"] and lengths.tolist() == [steps]
	for head, arrays in per_head.items():
		for key in ("weights", "plan_weights"):
			w = arrays[key]
			assert w.shape == (steps, 4) and np.isfinite(w).all(), (head, key)
			np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
		# Top-2 routing: exactly two experts carry weight on the real observation.
		assert ((arrays["weights"] > 0).sum(-1) == 2).all()
		assert arrays["entropy"].shape == (steps,) and arrays["plan_entropy"].shape == (steps,)
		assert 0 < arrays["plan_entropy"].min() and arrays["plan_entropy"].max() <= np.log(2) + 1e-5
		np.testing.assert_allclose(arrays["usage"].sum(), 1.0)

	with np.load(out / "results.npz") as r:
		assert r["rewards"].shape == (steps,) and r["actions"].shape == (steps, 6)
		assert r["observations"].shape == (steps, 24) and r["episode_lengths"].tolist() == [steps]
		assert r["episode_rewards"][0] == pytest.approx(r["rewards"].sum(), rel=1e-5)
		assert np.abs(r["actions"]).max() <= 1

	assert sum(line.startswith("step ") for line in printed.splitlines()) == steps  # --show-weights
	table = (out / "summary.md").read_text()
	assert table.strip() in printed
	for head in per_head:
		assert (out / f"gates_{head}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
	video = out / "video.mp4"
	assert video.is_file() and video.stat().st_size > 0 or "video.mp4 not written:" in printed

	assert cli_main(["analyze", str(out / "weight_stats.npz"), "--out", str(tmp_path / "again")]) == 0
	assert (tmp_path / "again" / "summary.md").read_text() == table
	assert capsys.readouterr().out.strip() == table.strip()
	assert not os.path.exists(tmp_path / "again" / "video.mp4")


@pytest.mark.parametrize("task, tasks, message", [
	("walker-walk", "walker-walk", "--tasks is for multitask checkpoints"),
	("mt30", "walker-walk,walker-moonwalk", "--tasks: 'walker-moonwalk' is not a task of mt30"),
	("mt30", "30", "--tasks: '30' is not a task of mt30"),
	("mt30", "1,walker-walk", "--tasks names 'walker-walk' twice"),
])
def test_bad_tasks_are_one_line_errors(tdmpc2_root, tmp_path, capsys, unpatched, task, tasks, message):
	path = tmp_path / "moe.pt"
	torch.save({"model": {}, "moe": MOE_SETTINGS}, path)
	code = cli_main(["play", "--tdmpc2", str(tdmpc2_root), "--checkpoint", str(path), "--out", str(tmp_path / "out"),
					 "--device", "cpu", "--tasks", tasks, f"task={task}", "model_size=1"])
	assert code == 1
	assert message in _one_line_error(capsys)


def test_multitask_checkpoint_on_a_single_task_is_one_line_error(tdmpc2_root, tmp_path, capsys, unpatched):
	path = tmp_path / "mt30.pt"
	torch.save({"model": {"_task_emb.weight": torch.zeros(30, 96)}, "moe": MOE_SETTINGS}, path)
	code = cli_main(["play", "--tdmpc2", str(tdmpc2_root), "--checkpoint", str(path), "--out", str(tmp_path / "out"),
					 "--device", "cpu", "task=walker-walk", "model_size=1"])
	assert code == 1
	assert "is a multitask checkpoint (30 task embeddings); play it with the task set it was trained on (task=mt30" \
		in _one_line_error(capsys)
