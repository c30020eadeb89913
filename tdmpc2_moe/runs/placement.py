"""
Where a sweep job runs on its node (docs/design.md 18): the GPU it sees, the EGL device that renders
for it and how many torch threads it uses. Each job trains in a process of its own (sweep.py), and
these are variables of that process's environment, set before it starts, so before anything in it
touches CUDA, OpenMP or EGL.

- Launchers whose jobs run on this node (joblib, submitit_local, Hydra's basic one) on a node with
  GPUs: job `num` sees one GPU, `gpus[num % len(gpus)]` (round-robin; `gpus` is `sweep_gpus`, else
  the GPUs `CUDA_VISIBLE_DEVICES` lists, else every GPU the node has).
- Ray (`hydra/launcher=ray`) schedules jobs by the resources they ask for
  (`hydra.launcher.ray.remote.num_gpus=0.125`: 8 jobs per GPU) and sets `CUDA_VISIBLE_DEVICES` of the
  job's worker itself; the job keeps it. SLURM (submitit_slurm) gives each job its own allocation.
- Either way, a job that sees exactly one GPU renders on it: `MUJOCO_EGL_DEVICE_ID` is set to that
  GPU's index (EGL numbers the node's devices as `nvidia-smi` does, whatever CUDA_VISIBLE_DEVICES hides).
- `sweep_threads` (default 1, as the fork's users ran 63 jobs on a node): OMP_NUM_THREADS and
  MKL_NUM_THREADS of every job; 0 leaves them as they are.
"""
import os

# Hydra launcher classes whose jobs run as processes of the node the sweep starts on.
LOCAL_LAUNCHERS = ("JoblibLauncher", "LocalLauncher", "BasicLauncher")
RAY_LAUNCHER = "RayLauncher"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def device_count():
	"""Returns the number of CUDA devices torch sees here (0 without CUDA), without starting CUDA in this process."""
	import torch
	return torch.cuda.device_count() if torch.cuda.is_available() else 0


def node_gpus(sweep_gpus=None, environ=None, count=None):
	"""
	Returns the GPU ids (strings) that local jobs are spread over: `sweep_gpus` when given, else the
	entries of CUDA_VISIBLE_DEVICES when it is set, else "0" .. "count-1" (`count` defaults to
	`device_count()`); [] on a machine without GPUs.
	"""
	environ = os.environ if environ is None else environ
	if sweep_gpus:
		return [str(g) for g in sweep_gpus]
	visible = environ.get("CUDA_VISIBLE_DEVICES")
	if visible is not None:
		return [g.strip() for g in visible.split(",") if g.strip()]
	return [str(i) for i in range(device_count() if count is None else count)]


def launcher_name(launcher):
	"""Returns the class name of a composed `hydra.launcher` config node, e.g. "JoblibLauncher"."""
	return launcher._target_.rsplit(".", 1)[-1]


def job_gpus(launcher, sweep_gpus=None):
	"""
	Returns the GPU ids the jobs of the launcher class named `launcher` are spread over: the node's
	(node_gpus) for launchers that run jobs here, [] for Ray and SLURM, which assign GPUs themselves.
	"""
	return node_gpus(sweep_gpus) if launcher in LOCAL_LAUNCHERS else []


def job_environment(num, launcher, gpus, threads, environ=None):
	"""
	Returns the variables {name: value} to set in the environment of job number `num` started by the
	launcher class named `launcher`: threads, the job's GPU (local launchers, `gpus` non-empty) and
	the EGL device of the one GPU the job sees.
	"""
	environ = os.environ if environ is None else environ
	env = {}
	if threads:
		env.update({name: str(threads) for name in THREAD_VARIABLES})
	if launcher in LOCAL_LAUNCHERS and gpus:
		env["CUDA_VISIBLE_DEVICES"] = gpus[num % len(gpus)]
	visible = [g for g in env.get("CUDA_VISIBLE_DEVICES", environ.get("CUDA_VISIBLE_DEVICES", "")).split(",") if g]
	if len(visible) == 1 and visible[0].isdigit():
		env["MUJOCO_EGL_DEVICE_ID"] = visible[0]
	return env


def describe(launcher, gpus, threads):
	"""Returns the sweep summary line's words for where its jobs run, e.g. '1 torch thread per job, GPUs 0,1 round-robin'."""
	parts = [f"{threads} torch thread{'s' if threads != 1 else ''} per job" if threads else "torch threads as the environment sets them"]
	if launcher == RAY_LAUNCHER:
		parts.append("GPUs as Ray assigns them")
	elif launcher in LOCAL_LAUNCHERS:
		parts.append(f"one GPU each, round-robin over {','.join(gpus)}" if gpus else "no GPU")
	return ", ".join(parts)


def run_device(device):
	"""
	Returns what a run's run.json records of where and how it ran: the torch device it trained on, the
	GPUs it saw (CUDA_VISIBLE_DEVICES), its GPU's name, the EGL device, its torch threads and whether
	torch ran deterministic algorithms (`deterministic=true`).
	"""
	import torch
	out = {"device": str(device) if device is not None else "cuda:0",
		   "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
		   "egl_device": os.environ.get("MUJOCO_EGL_DEVICE_ID"), "torch_threads": torch.get_num_threads(),
		   "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
	if out["device"].startswith("cuda") and torch.cuda.is_available():
		out["gpu_name"] = torch.cuda.get_device_name(torch.device(out["device"]))
	return out
