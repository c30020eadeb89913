"""
What a finished run leaves behind, read from its files as a user would: the MoE metrics of every update
in its offline wandb run (read back from the .wandb file wandb wrote, not from this package's logging),
a checkpoint of where the run ended that `play`, `checkpoint=` and `resume=true` take, and a resumed
run logging to a new wandb run named after the step it resumed at.
"""
import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

from tdmpc2_moe.analysis import gate_stats
from tdmpc2_moe.cli import main as cli_main
from tdmpc2_moe.runs import checkpoint

pytestmark = pytest.mark.slow  # short real trainings
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="wandb is not installed (pip install wandb)")

MODEL = ["task=cartpole-balance", "model_size=null", "mlp_dim=32", "latent_dim=16", "enc_dim=32", "num_q=2",
		 "num_bins=11", "use_moe=true", "gate_history_rows=64"]
PLAN = ["num_samples=32", "num_elites=4", "num_pi_trajs=4", "iterations=1"]
RUN = [*MODEL, *PLAN, "seed=3", "eval_freq=500", "seed_steps=500", "device=cpu", "compile=false", "batch_size=16",
	   "eval_episodes=1", "save_video=false", "exp_name=end", "enable_wandb=true", "wandb_project=tdmpc2-moe-test",
	   "wandb_entity=offline", "checkpoint_interval=1000"]
HEADS = ("dynamics", "reward", "pi")


def _train(root, cwd, *keys):
	env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", WANDB_MODE="offline",
			   WANDB_SILENT="true")
	done = subprocess.run([sys.executable, "-m", "tdmpc2_moe", "train", "--tdmpc2", str(root), *RUN, *keys], cwd=cwd,
						  env=env, capture_output=True, text=True, timeout=900)
	assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
	return done.stdout


def wandb_records(path):
	"""
	Returns the records (wandb_internal_pb2.Record) of the .wandb file at `path`: a 7-byte header, then
	LevelDB-style log blocks of 32 KiB whose chunks (crc32c, length, type: full, first, middle, last)
	carry one serialised Record each.
	"""
	data, block, pos, records, partial = path.read_bytes(), 32768, 7, [], b""
	assert data[:4] == b":W&B"
	while pos + 7 <= len(data):
		left = block - pos % block
		if left < 7:
			pos += left
			continue
		_, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
		if kind == 0:
			pos += left  # the rest of the block is padding
			continue
		chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
		partial = chunk if kind in (1, 2) else partial + chunk
		if kind in (1, 4):
			record = wandb_pb.Record()
			record.ParseFromString(partial)
			records.append(record)
	return records


def _wandb_run(work_dir, index=-1):
	"""Returns (history rows by _step, the run's latest display name) of the work_dir's offline wandb runs (oldest first)."""
	runs = sorted((work_dir / "wandb").glob("offline-run-*"))
	records = wandb_records(next(runs[index].glob("run-*.wandb")))
	history = {}
	for r in records:
		if r.WhichOneof("record_type") == "history":
			row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
			history[row["_step"]] = row
	names = [r.run.display_name for r in records if r.WhichOneof("record_type") == "run" and r.run.display_name]
	return history, names[-1] if names else None, len(runs)


def test_a_finished_run_leaves_its_moe_metrics_in_wandb_and_a_checkpoint_of_its_end(tdmpc2_root, tmp_path):
	_train(tdmpc2_root, tmp_path, "steps=1500")
	work = tmp_path / "logs" / "cartpole-balance" / "3" / "end"
	history, name, runs = _wandb_run(work)
	assert runs == 1 and name == "3"
	# Upstream logs training metrics at episode ends; the updates start after the one at step 500.
	for step in (1000, 1500):
		row = history[step]
		assert math.isfinite(row["train/consistency_loss"])  # upstream's own losses, beside the MoE metrics
		for key in ("moe_aux_loss", "moe_entropy", "moe_max_load"):
			assert math.isfinite(row[f"train/{key}"])
		for head in HEADS:
			assert row[f"train/moe_temperature/{head}"] == 1.0
			assert 0 < row[f"train/moe_entropy/{head}"] <= math.log(2) + 1e-5  # top-2
			usage = [row[f"train/moe_usage/{head}/{e}"] for e in range(4)]
			assert sum(usage) == pytest.approx(1.0) and max(usage) == row[f"train/moe_max_load/{head}"]
		assert row["train/moe_aux_loss"] == pytest.approx(sum(row[f"train/moe_aux_loss/{h}"] for h in HEADS))
	assert not any(k.startswith("train/moe") for k in history[500])

	# The checkpoint holds where the run ended (step 1500, 500 steps after the interval's one at 1000).
	state = checkpoint.load(work / "checkpoints" / "latest.pt")
	assert state["step"] == 1500 and state["episode"] == 3
	out = tmp_path / "play"
	assert cli_main(["play", "--tdmpc2", str(tdmpc2_root), "--checkpoint", str(work / "checkpoints" / "latest.pt"),
					 "--num-steps", "10", "--device", "cpu", "--out", str(out), *MODEL, *PLAN]) == 0
	per_head, lengths, _ = gate_stats.load_weight_stats(str(out / "weight_stats.npz"))
	assert list(per_head) == list(HEADS) and lengths.tolist() == [10]
	played = torch.load(work / "checkpoints" / "latest.pt", weights_only=True)["state"]["agent"]["model"]
	assert torch.equal(checkpoint.model_file(work / "checkpoints" / "latest.pt")["model"]["_dynamics.router.gate.weight"],
					   played["_dynamics.router.gate.weight"])

	started = _train(tdmpc2_root, tmp_path, "steps=500", "exp_name=from_end", "checkpoint_interval=0",
					 f"checkpoint={work / 'checkpoints' / 'latest.pt'}")
	assert "starting from the model in checkpoint=" in started

	# Resumed with more steps: it goes on from step 1500, into a new wandb run named after that step.
	resumed = _train(tdmpc2_root, tmp_path, "steps=2000", "resume=true")
	assert "at step 1,500, episode 3" in resumed
	history, name, runs = _wandb_run(work)
	assert runs == 2 and name == "3 (resumed at step 1500)" and 2000 in history
	assert checkpoint.load(work / "checkpoints" / "latest.pt")["step"] == 2000
