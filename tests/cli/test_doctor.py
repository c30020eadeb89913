"""`tdmpc2-moe doctor` finds each problem it knows in a fake environment made for it, and says how to fix it."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tdmpc2_moe
from tdmpc2_moe.upstream import checkout
from tdmpc2_moe.cli import doctor
from tdmpc2_moe.families.registry import FAMILIES
from conftest import REPO

PACKAGE = Path(tdmpc2_moe.__file__).resolve().parent
REQUIREMENTS = REPO / "requirements.txt"


def _doctor(*args, pythonpath=(), env=None, cwd="/"):
	"""Runs `python -m tdmpc2_moe doctor --no-render ARGS` in a subprocess; returns (exit code, output)."""
	env = dict(os.environ if env is None else env)
	paths = [str(p) for p in pythonpath] + [str(PACKAGE.parent)]
	env["PYTHONPATH"] = os.pathsep.join(paths)
	out = subprocess.run([sys.executable, "-m", "tdmpc2_moe", "doctor", "--no-render", *args], capture_output=True,
						 text=True, env=env, cwd=cwd, timeout=600)
	return out.returncode, out.stdout + out.stderr


def _env_without_checkout():
	env = dict(os.environ)
	env.pop(checkout.ENV_VAR, None)
	return env


def _fake_distribution(root, name, version):
	"""Makes `root` look like a site directory where distribution `name` has `version`."""
	info = root / f"{name.replace('-', '_')}-{version}.dist-info"
	info.mkdir(parents=True)
	(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
	return root


def test_known_good_versions_agree_with_requirements():
	if not REQUIREMENTS.is_file():
		pytest.skip("needs requirements.txt next to tests/")
	pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", REQUIREMENTS.read_text(), re.M))
	for name, version in doctor.KNOWN_GOOD.items():
		if name != "torch":
			assert pins[name] == version, f"doctor says {name} {version}, requirements.txt {pins.get(name)}"


def test_wrong_tensordict_is_blocking_with_its_fix(tmp_path):
	site = _fake_distribution(tmp_path, "tensordict", "0.10.0")
	code, out = _doctor(pythonpath=[site], env=_env_without_checkout())
	assert code == 1
	assert "ERROR  tensordict 0.10.0 is not the known-good 0.8.3" in out
	assert "fix: pip install tensordict==0.8.3" in out


def test_no_checkout_at_all_is_blocking(tmp_path):
	code, out = _doctor(env=_env_without_checkout())
	assert code == 1
	assert "ERROR  no TD-MPC2 checkout" in out and "git clone https://github.com/nicklashansen/tdmpc2" in out
	assert "patch() " not in out


def test_reference_backend_without_a_compiler_says_both(tmp_path):
	shutil.copytree(PACKAGE, tmp_path / "tdmpc2_moe", ignore=shutil.ignore_patterns("*.so", "__pycache__", "_csrc"))
	env = dict(_env_without_checkout(), CXX="/nonexistent/c++")
	code, out = _doctor(env=env, pythonpath=[tmp_path])
	assert "warn   operator backend: reference" in out
	assert "install a C++ compiler" in out and "pip install --no-build-isolation ." in out


def test_checkout_at_another_commit_is_named_and_a_broken_one_is_blocking(tmp_path):
	repo = tmp_path / "tdmpc2"
	pkg = repo / "tdmpc2"
	(pkg / "common").mkdir(parents=True)
	(pkg / "tdmpc2.py").write_text("raise ImportError('not really TD-MPC2')\n")
	(pkg / "common" / "layers.py").write_text("")
	(pkg / "config.yaml").write_text("task: walker-walk\n")
	git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
	subprocess.run(["git", "init", "-q", str(repo)], check=True)
	subprocess.run(git + ["add", "."], check=True)
	subprocess.run(git + ["commit", "-qm", "other"], check=True)
	commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
	code, out = _doctor("--tdmpc2", str(repo), env=_env_without_checkout())
	assert f"is at commit {commit}, not the pinned {checkout.PINNED_COMMIT}" in out
	assert f"git -C {repo} checkout {checkout.PINNED_COMMIT}" in out
	assert "ERROR  patch() could not build a MoE agent" in out
	assert code == 1


def test_healthy_checkout_builds_a_moe_agent_and_each_task_family_is_named(tdmpc2_root):
	code, out = _doctor("--tdmpc2", str(tdmpc2_root))
	assert "ok     patch() builds a MoE agent (MoE heads: dynamics, pi, reward)" in out
	assert "ERROR" not in out and code == 0, out
	# Each family made one environment (its sizes and speed), or says why not and how to fix it.
	assert "ok     task family DMC runs: walker-walk has 24 observation and 6 action dims, 500-step episodes" in out
	assert "ok     task family Gymnasium MuJoCo runs: mujoco-halfcheetah has 17 observation and 6 action dims" in out
	assert "ok     task family Gymnasium runs: gym:Pendulum-v1 has 3 observation and 1 action dims, 200-step" in out
	assert "warn   task family Meta-World (upstream's mw-*, e.g. mw-reach): does not run here: Meta-World is not " \
		   "installed" in out
	assert "warn   task family ManiSkill" in out and "does not run here: ManiSkill2 is not installed" in out
	for family, example, sizes in [("MyoSuite", "myo-key-turn-hard", "93 observation and 39 action dims, 100-step"),
								   ("HumanoidBench", "humanoid_h1hand-run-v0", "151 observation and 61 action dims, 1000-step")]:
		installed = [f for f in FAMILIES if f.name == family][0].missing() is None
		line = f"ok     task family {family} runs: {example} has {sizes}" if installed else \
			f"warn   task family {family} "
		assert line in out, out
