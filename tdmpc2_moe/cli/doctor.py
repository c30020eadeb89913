"""
`tdmpc2-moe doctor [--tdmpc2 PATH]`: what runs and why, and what to fix.

Checks, each printed as one line (ok / warn / ERROR) with a fix under every problem:
- versions of torch, tensordict, torchrl, dm-control and mujoco against the known-good set
  (upstream's `Ensemble` breaks with another tensordict: that one is blocking);
- the operator backend and why it is not "cuda" (a C++ compiler and ninja when it must be built);
- the kernels' self-check (tdmpc2_moe/ops/kernel_check.py) on every device it finds: the CPU and each GPU;
- the TD-MPC2 checkout: found, and its commit against the pinned one;
- whether patch() builds a MoE agent in that checkout (on the CPU, a small model);
- each task family (DMC, Gymnasium MuJoCo, MyoSuite, HumanoidBench, Gymnasium ids, Meta-World, ManiSkill):
  runs here, or why not and how to fix it, by making one environment of each in a process of its own
  (upstream/family_probe.py; a family whose package is missing is named without one);
- whether MuJoCo can render (only videos need it), in a subprocess with a time limit.
Exit code 1 when a blocking problem (ERROR) was found, else 0.
"""
import argparse
import contextlib
import importlib.metadata
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

# The versions this plugin and upstream TD-MPC2 at the pinned commit were tested with (requirements.txt
# pins the same; tests check that the two agree). Only tensordict is blocking: its newer releases break
# upstream's Ensemble.
KNOWN_GOOD = {"torch": "2.13.0", "tensordict": "0.8.3", "torchrl": "0.8.1", "dm-control": "1.0.20", "mujoco": "3.1.6"}
BLOCKING = {"tensordict"}
WHY = {"torch": "the tested release", "tensordict": "newer tensordict breaks upstream's Ensemble (common/layers.py)",
	   "torchrl": "upstream's replay buffer (common/buffer.py) is built on it",
	   "dm-control": "upstream's DMControl tasks", "mujoco": "the simulator behind dm-control"}
_RENDER_PROBE = ("from dm_control import suite\n"
				 "env = suite.load('cartpole', 'balance')\n"
				 "print(env.physics.render(64, 64).shape)\n")


@dataclass
class Finding:
	"""One check's result: `level` is "ok", "warn" or "error"; `fix` says what to do (None when ok)."""
	level: str
	what: str
	fix: str = None


def installed_version(name):
	"""Returns the installed version of distribution `name`, or None when it is not installed."""
	try:
		return importlib.metadata.version(name)
	except importlib.metadata.PackageNotFoundError:
		return None


def _release(version):
	"""Returns the major.minor of `version` ("2.13.0+cpu" -> "2.13")."""
	return ".".join(version.split("+")[0].split(".")[:2])


def check_versions():
	"""Returns one Finding per package of KNOWN_GOOD (a different major.minor is a problem)."""
	findings = []
	for name, good in KNOWN_GOOD.items():
		have = installed_version(name)
		pin = f"pip install {name}=={good}" if name != "torch" else f"pip install torch=={good} (or a CUDA build of it)"
		level = "error" if name in BLOCKING or name == "torch" else "warn"
		if have is None:
			findings.append(Finding(level, f"{name} is not installed ({WHY[name]})", pin))
		elif _release(have) != _release(good):
			findings.append(Finding(level, f"{name} {have} is not the known-good {good} ({WHY[name]})", pin))
		else:
			findings.append(Finding("ok", f"{name} {have} (known good {good})"))
	return findings


def check_backend():
	"""Returns Findings on the operator backend, why it is not cuda, and the compiler that would build it."""
	from ..ops import operators as ops
	backend, reason = ops.backend(), ops.backend_reason()
	compiler = os.environ.get("CXX", "c++")
	has_compiler = shutil.which(compiler) is not None
	if backend == "reference" and reason.startswith("TDMPC2_MOE_BACKEND=reference"):
		return [Finding("warn", f"operator backend: reference, slow ({reason})",
						"unset TDMPC2_MOE_BACKEND to use the compiled kernels")]
	if backend == "reference":
		fix = "install the package with its extension: `pip install --no-build-isolation .` next to torch"
		if not has_compiler:
			fix = f"install a C++ compiler (e.g. `apt-get install g++`; {compiler!r} is not on PATH), then {fix}"
		return [Finding("warn", f"operator backend: reference, slow ({reason})", fix)]
	findings = [Finding("ok", f"operator backend: {backend} ({reason})")]
	if backend == "cpu":
		import torch
		if torch.cuda.is_available():
			findings.append(Finding("warn", "a CUDA device is present but the extension has no CUDA kernels",
									"rebuild next to a CUDA torch with nvcc on PATH: `TDMPC2_MOE_CUDA=1 pip install "
									"--no-build-isolation .`"))
	return findings


def check_self_check():
	"""Returns one Finding per device with compiled kernels (the CPU, every CUDA device): the self-check's result there."""
	import torch
	from ..ops import kernel_check, operators as ops
	from ..ops.backend import BACKEND_ENV
	if ops.backend() == "reference":
		return [Finding("ok", "self-check: nothing to check (no compiled kernels in use)")]
	devices = ["cpu"] + ([f"cuda:{i}" for i in range(torch.cuda.device_count())] if ops.backend() == "cuda" else [])
	findings = []
	for device in devices:
		try:
			result = kernel_check.self_check(device)
		except kernel_check.SelfCheckError as exc:
			findings.append(Finding("error", str(exc), f"run with {BACKEND_ENV}=reference until it is fixed"))
			continue
		findings.append(Finding("ok", f"self-check on {device}: the kernels agree with the reference on "
									  f"{result['cases']} cases ({result['seconds'] * 1000:.0f} ms)"))
	return findings


def _git_commit(root):
	try:
		out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
	except (OSError, subprocess.TimeoutExpired):
		return None
	return out.stdout.strip() if out.returncode == 0 else None


def check_checkout(path):
	"""Returns (Findings, package directory or None) for the TD-MPC2 checkout at `path` ($TDMPC2_ROOT when None)."""
	from ..upstream import checkout
	clone = (f"git clone https://github.com/nicklashansen/tdmpc2 ~/tdmpc2 && git -C ~/tdmpc2 checkout "
			 f"{checkout.PINNED_COMMIT}; then pass --tdmpc2 ~/tdmpc2 or set {checkout.ENV_VAR}")
	try:
		pkg = checkout.locate(path)
	except FileNotFoundError as exc:
		return [Finding("error", f"no TD-MPC2 checkout: {exc}", clone)], None
	commit = _git_commit(pkg.parent) or _git_commit(pkg)
	if commit is None:
		return [Finding("warn", f"TD-MPC2 at {pkg}: not a git checkout, its commit cannot be checked",
						f"use a git checkout at {checkout.PINNED_COMMIT}")], pkg
	if commit != checkout.PINNED_COMMIT:
		return [Finding("warn", f"TD-MPC2 at {pkg} is at commit {commit}, not the pinned {checkout.PINNED_COMMIT}",
						f"git -C {pkg.parent} checkout {checkout.PINNED_COMMIT}")], pkg
	return [Finding("ok", f"TD-MPC2 at {pkg}, pinned commit {commit[:12]}")], pkg


def check_patch_builds(pkg):
	"""Returns a Finding on whether patch() builds a MoE agent (model_size 1, CPU) in checkout `pkg`."""
	from ..upstream import patching, checkout
	from ..upstream.heads import moe_blocks
	from ..settings.checks import first_line
	try:
		patching.patch(device="cpu")
		cfg = checkout.load_cfg(["task=walker-walk", "model_size=1", "compile=false", "use_moe=true", "device=cpu",
								 "monitor_mem_interval=0"], pkg)
		cfg.obs_shape, cfg.action_dim, cfg.episode_length = {"state": (24,)}, 6, 500
		from tdmpc2 import TDMPC2
		with contextlib.redirect_stdout(io.StringIO()):  # upstream prints its config while building
			heads = sorted(moe_blocks(TDMPC2(cfg).model))
	except Exception as exc:  # whatever upstream raises: the user needs its first line, not a traceback
		return Finding("error", f"patch() could not build a MoE agent: {type(exc).__name__}: {first_line(exc)}",
					   "check the versions above and that the checkout is at the pinned commit")
	finally:
		patching.unpatch()
	return Finding("ok", f"patch() builds a MoE agent (MoE heads: {', '.join(heads)})")


_FAMILY_PROBE = "from tdmpc2_moe.upstream import family_probe; family_probe.main()"


def check_families(pkg, timeout=300):
	"""
	Returns one Finding per task family (families/registry.py): ok with its example task's sizes and env
	steps/s, or why it does not run here and the fix. Each family's example is made in a subprocess.
	DMC failing is blocking (upstream's default tasks); another family is a warning (only its tasks need it).
	"""
	import json
	from ..families.registry import FAMILIES
	findings = []
	for family in FAMILIES:
		level = "error" if family.name == "DMC" else "warn"
		why = family.missing()
		if why:
			findings.append(Finding(level, f"task family {family.name} ({family.names}): does not run here: {why}",
									None if family.install in why else family.install))
			continue
		try:
			out = subprocess.run([sys.executable, "-c", _FAMILY_PROBE, family.example, str(pkg)], capture_output=True,
								 text=True, timeout=timeout, env=dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl")))
			lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
			result = json.loads(lines[-1]) if lines else {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
		except subprocess.TimeoutExpired:
			result = {"error": f"making {family.example} took over {timeout} s"}
		if "ok" in result:
			r = result["ok"]
			findings.append(Finding("ok", f"task family {family.name} runs: {r['task']} has {r['obs_dim']} observation and "
										  f"{r['action_dim']} action dims, {r['episode_length']}-step episodes, "
										  f"{r['steps_per_s']:.0f} env steps/s"))
		else:
			findings.append(Finding(level, f"task family {family.name} ({family.names}): {family.example} does not run "
										   f"here: {result['error']}", family.install))
	return findings


def check_rendering(timeout=120):
	"""Returns a Finding on whether MuJoCo renders with MUJOCO_GL (default egl), tried in a subprocess."""
	gl = os.environ.get("MUJOCO_GL", "egl")
	env = dict(os.environ, MUJOCO_GL=gl)
	try:
		out = subprocess.run([sys.executable, "-c", _RENDER_PROBE], capture_output=True, text=True, env=env, timeout=timeout)
	except subprocess.TimeoutExpired:
		out = None
	if out is not None and out.returncode == 0:
		return Finding("ok", f"rendering works (MUJOCO_GL={gl})")
	lines = (out.stderr.strip().splitlines() if out is not None else []) or ["timed out"]
	return Finding("warn", f"rendering fails with MUJOCO_GL={gl} ({lines[-1][:160]}); only videos need it",
				   "try MUJOCO_GL=osmesa (apt-get install libosmesa6) or MUJOCO_GL=egl with a GPU driver")


def diagnose(path=None, render=True, families=True):
	"""Returns every Finding, in the order printed."""
	findings = check_versions()
	if installed_version("torch") is None:
		return findings
	findings += check_backend()
	findings += check_self_check()
	checkout, pkg = check_checkout(path)
	findings += checkout
	if pkg is not None:
		findings.append(check_patch_builds(pkg))
		if families:
			findings += check_families(pkg)
	if render:
		findings.append(check_rendering())
	return findings


def report(findings):
	"""Returns the printed text of `findings` and the exit code (1 when any is an error)."""
	label = {"ok": "ok   ", "warn": "warn ", "error": "ERROR"}
	lines = []
	for f in findings:
		lines.append(f"{label[f.level]}  {f.what}")
		if f.fix:
			lines.append(f"       fix: {f.fix}")
	errors = sum(f.level == "error" for f in findings)
	warnings = sum(f.level == "warn" for f in findings)
	lines.append(f"{errors} blocking problem(s), {warnings} warning(s)")
	return "\n".join(lines), int(errors > 0)


def main(argv=None):
	"""Entry point of `tdmpc2-moe doctor`; returns 1 when a blocking problem was found, else 0."""
	parser = argparse.ArgumentParser(prog="tdmpc2-moe doctor", description=__doc__.split("\n\n")[0].strip())
	parser.add_argument("--tdmpc2", metavar="PATH", default=None, help="TD-MPC2 checkout (default $TDMPC2_ROOT)")
	parser.add_argument("--no-render", action="store_true", help="skip the rendering check")
	parser.add_argument("--no-families", action="store_true", help="skip making one environment of each task family")
	args = parser.parse_args(argv)
	text, code = report(diagnose(args.tdmpc2, render=not args.no_render, families=not args.no_families))
	print(text)
	return code
