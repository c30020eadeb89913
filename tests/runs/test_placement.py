"""
Where sweep jobs run on a node (tdmpc2_moe/runs/placement.py): which job sees which GPU under joblib
with a stand-in GPU count, what Ray's assignment leaves alone, the EGL device and threads, the
sweep's refusals of GPU jobs it cannot place, Ray's free-form options, and combinations that are
one run.
"""
import pytest
from omegaconf import OmegaConf

from tdmpc2_moe.runs import placement, sweep
from tdmpc2_moe.settings import MoESettings


def test_the_nodes_gpus_come_from_the_setting_then_cuda_visible_devices_then_the_count():
	assert placement.node_gpus(None, environ={}, count=8) == [str(i) for i in range(8)]
	assert placement.node_gpus(None, environ={"CUDA_VISIBLE_DEVICES": "2,3"}, count=8) == ["2", "3"]
	assert placement.node_gpus((5, 7), environ={"CUDA_VISIBLE_DEVICES": "2,3"}, count=8) == ["5", "7"]
	assert placement.node_gpus(None, environ={}, count=0) == []
	assert placement.node_gpus(None, environ={"CUDA_VISIBLE_DEVICES": ""}, count=8) == []


def test_joblib_jobs_get_one_gpu_each_round_robin_with_the_egl_device_to_match():
	gpus = placement.node_gpus(None, environ={}, count=8)
	envs = [placement.job_environment(num, "JoblibLauncher", gpus, 1, environ={}) for num in range(63)]
	assert [e["CUDA_VISIBLE_DEVICES"] for e in envs[:10]] == ["0", "1", "2", "3", "4", "5", "6", "7", "0", "1"]
	assert all(e["MUJOCO_EGL_DEVICE_ID"] == e["CUDA_VISIBLE_DEVICES"] for e in envs)
	assert all(e["OMP_NUM_THREADS"] == e["MKL_NUM_THREADS"] == "1" for e in envs)
	# 63 runs on 8 GPUs, as the fork's users packed them: 8 on GPUs 0-6, 7 on GPU 7.
	per_gpu = [sum(e["CUDA_VISIBLE_DEVICES"] == str(g) for e in envs) for g in range(8)]
	assert per_gpu == [8, 8, 8, 8, 8, 8, 8, 7]


def test_without_gpus_nothing_but_the_threads_changes():
	assert placement.job_environment(3, "JoblibLauncher", [], 1, environ={}) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
	assert placement.job_environment(3, "JoblibLauncher", [], 0, environ={}) == {}
	assert placement.job_environment(0, "JoblibLauncher", [], 4, environ={})["OMP_NUM_THREADS"] == "4"


def test_ray_and_slurm_keep_the_gpu_they_assigned_and_render_on_it():
	# Ray sets CUDA_VISIBLE_DEVICES of the job's worker itself (fractions of one GPU share its index).
	env = placement.job_environment(5, "RayLauncher", ["0", "1"], 1, environ={"CUDA_VISIBLE_DEVICES": "3"})
	assert "CUDA_VISIBLE_DEVICES" not in env and env["MUJOCO_EGL_DEVICE_ID"] == "3"
	env = placement.job_environment(5, "SlurmLauncher", ["0", "1"], 1, environ={"CUDA_VISIBLE_DEVICES": "1,2"})
	assert "CUDA_VISIBLE_DEVICES" not in env and "MUJOCO_EGL_DEVICE_ID" not in env  # two GPUs: EGL picks
	env = placement.job_environment(5, "RayLauncher", [], 1, environ={"CUDA_VISIBLE_DEVICES": ""})
	assert "MUJOCO_EGL_DEVICE_ID" not in env  # a Ray job without a GPU sees none


def test_the_summary_says_where_jobs_run():
	assert placement.describe("JoblibLauncher", ["0", "1"], 1) == "1 torch thread per job, one GPU each, round-robin over 0,1"
	assert placement.describe("JoblibLauncher", [], 2) == "2 torch threads per job, no GPU"
	assert placement.describe("RayLauncher", [], 0) == "torch threads as the environment sets them, GPUs as Ray assigns them"


def test_sweep_gpus_and_threads_are_settings_that_name_themselves():
	assert MoESettings.resolve(sweep_gpus=[0, 2]).sweep_gpus == (0, 2)
	assert MoESettings.resolve(sweep_gpus="1,3").sweep_gpus == (1, 3)
	assert MoESettings.resolve().sweep_threads == 1 and MoESettings.resolve().sweep_gpus is None
	for bad in ([-1], ["a"], [], [True]):
		with pytest.raises(ValueError, match="sweep_gpus"):
			MoESettings.resolve(sweep_gpus=bad)
	with pytest.raises(ValueError, match="sweep_threads"):
		MoESettings.resolve(sweep_threads=-1)


def _launcher(target, **ray):
	return OmegaConf.create({"_target_": target, **({"ray": ray} if ray else {})})


def test_gpu_jobs_that_this_machine_cannot_place_are_refused_before_they_start():
	ray = "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
	joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
	cpu, cuda = MoESettings.resolve(device="cpu"), MoESettings.resolve()
	with pytest.raises(sweep.SweepError, match=r"hydra.launcher.ray.remote.num_gpus=0.125") as err:
		sweep.check_resources(_launcher(ray, init={"address": None}, remote={"num_gpus": 0.125}), [cpu], gpu_count=0)
	assert err.value.exit_code == 1
	with pytest.raises(sweep.SweepError, match="device=null"):
		sweep.check_resources(_launcher(joblib), [cuda], gpu_count=0)
	# Placeable: a GPU is there, the jobs train on the CPU, or a Ray cluster is named (its GPUs are not known here).
	sweep.check_resources(_launcher(ray, init={"address": None}, remote={"num_gpus": 0.125}), [cpu], gpu_count=1)
	sweep.check_resources(_launcher(joblib), [cpu], gpu_count=0)
	sweep.check_resources(_launcher(ray, init={"address": "auto"}, remote={"num_gpus": 0.125}), [cpu], gpu_count=0)


def test_rays_free_form_options_are_added_for_the_user():
	assert sweep.with_ray_options(["seed=1,2", "hydra/launcher=ray", "hydra.launcher.ray.remote.num_gpus=0.125",
								   "hydra.launcher.ray.init.address=auto", "++hydra.launcher.ray.init.num_cpus=4"]) == [
		"seed=1,2", "hydra/launcher=ray", "++hydra.launcher.ray.remote.num_gpus=0.125",
		"++hydra.launcher.ray.init.address=auto", "++hydra.launcher.ray.init.num_cpus=4"]


def test_plain_combinations_that_differ_only_in_moe_keys_are_one_run():
	jobs = [["seed=1", "use_moe=false", "moe_experts=4"], ["seed=1", "use_moe=false", "moe_experts=6"],
			["seed=1", "use_moe=true", "moe_experts=4"], ["seed=1", "use_moe=true", "moe_experts=6"],
			["seed=2", "use_moe=false", "moe_experts=6"]]
	settings = [MoESettings.resolve(use_moe=j[1] == "use_moe=true", moe_experts=int(j[2][-1])) for j in jobs]
	same = sweep.same_runs(jobs, settings)
	assert same == {"moe_experts=6 seed=1 use_moe=false": "moe_experts=4 seed=1 use_moe=false"}
