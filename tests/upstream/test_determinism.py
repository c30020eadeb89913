"""
`deterministic=true` (tdmpc2_moe/upstream/determinism.py): what building a patched agent with it sets
in the process, that without it nothing is set, and that a key the user already set (the cuBLAS
workspace) is kept. Each case runs in a fresh process: the settings are process-wide. That a run with
it repeats is tests/runs/test_reproducible.py.
"""
import json
import os
import subprocess
import sys

import pytest

from tdmpc2_moe.upstream import determinism

BUILD = """
import json, os, sys, torch
from tdmpc2_moe.upstream import checkout, patching
checkout.activate()
import train  # upstream's train.py sets cudnn.benchmark = True at import, before any agent exists
patching.patch()
cfg = checkout.load_cfg(["task=walker-walk", "model_size=1", "compile=false", "device=cpu", "steps=1000",
						 "monitor_mem_interval=0", *sys.argv[1:]])
cfg.obs_shape, cfg.action_dim, cfg.episode_length = {"state": (24,)}, 6, 500
before = torch.backends.cudnn.benchmark
from tdmpc2 import TDMPC2
TDMPC2(cfg)
print(json.dumps(dict(before=before, algorithms=torch.are_deterministic_algorithms_enabled(),
					  cudnn_deterministic=torch.backends.cudnn.deterministic, cudnn_benchmark=torch.backends.cudnn.benchmark,
					  cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))))
"""


def _built(tdmpc2_root, *keys, **env):
	env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"} | env
	env["PYTHONPATH"] = os.pathsep.join(sys.path)
	done = subprocess.run([sys.executable, "-c", BUILD, *keys], capture_output=True, text=True, env=env, timeout=300)
	assert done.returncode == 0, done.stderr[-3000:]
	return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_deterministic_agent_sets_torchs_switches_before_its_model_exists(tdmpc2_root):
	got = _built(tdmpc2_root, "deterministic=true")
	assert got == dict(before=True, algorithms=True, cudnn_deterministic=True, cudnn_benchmark=False,
					   cublas=determinism.CUBLAS_WORKSPACE)


def test_without_it_nothing_changes(tdmpc2_root):
	got = _built(tdmpc2_root)
	assert got == dict(before=True, algorithms=False, cudnn_deterministic=False, cudnn_benchmark=True, cublas=None)


def test_a_cublas_workspace_the_user_set_is_kept(tdmpc2_root):
	assert _built(tdmpc2_root, "deterministic=true", CUBLAS_WORKSPACE_CONFIG=":16:8")["cublas"] == ":16:8"


def test_off_returns_nothing_and_names_the_setting_on_bad_values():
	assert determinism.apply(False) == {}
	from tdmpc2_moe.settings import MoESettings
	with pytest.raises(ValueError, match="deterministic"):
		MoESettings.resolve(deterministic="yes")
