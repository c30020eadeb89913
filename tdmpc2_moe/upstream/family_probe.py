"""
Whether a task family runs on this machine, found by making one of its environments (docs/design.md 21):
what `tdmpc2-moe doctor` runs for each family, each in a process of its own (a family's package may crash
or hang its process: ManiSkill without Vulkan, an EGL driver).

`probe(task)` builds `task` with the patched `make_env` from the checkout's config (the same path as
`tdmpc2-moe train`), resets it and takes random steps; `python -c "from tdmpc2_moe.upstream import
family_probe; family_probe.main()" TASK [PKG]` prints the result as one JSON line.
"""
import contextlib
import io
import json
import os
import sys
import time

from . import checkout, patching
from ..settings.checks import first_line


def probe(task, path=None, steps=200):
	"""
	Makes `task` (upstream's checkout at `path`, $TDMPC2_ROOT when None), resets it and takes `steps`
	random steps (resetting at episode ends). Returns {task, obs_dim, action_dim, episode_length,
	steps_per_s}. Raises whatever making or stepping raises (families.TaskError for what a family refuses).
	"""
	os.environ.setdefault("MUJOCO_GL", "egl")
	patching.patch(device="cpu")
	cfg = checkout.load_cfg([f"task={task}", "model_size=1", "compile=false", "device=cpu"], path)
	from envs import make_env
	with contextlib.redirect_stdout(io.StringIO()):  # families print while building (MyoSuite's banner)
		env = make_env(cfg)
		env.reset()
		start = time.perf_counter()
		for _ in range(steps):
			_, _, done, _ = env.step(env.rand_act())
			if done:
				env.reset()
		seconds = time.perf_counter() - start
	obs_dim = next(iter(cfg.obs_shape.values()))[0]
	return dict(task=task, obs_dim=int(obs_dim), action_dim=int(cfg.action_dim), episode_length=int(cfg.episode_length),
				steps_per_s=steps / seconds)


def main(argv=None):
	"""Probes TASK (argv: TASK [PKG]) and prints {"ok": {...}} or {"error": "Type: first line"} as one JSON line."""
	argv = sys.argv[1:] if argv is None else argv
	try:
		result = {"ok": probe(argv[0], argv[1] if len(argv) > 1 else None)}
	except Exception as exc:  # the doctor reports whatever a family raises, as one line
		result = {"error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
	print(json.dumps(result), flush=True)
	# Skip interpreter teardown: some families' renderers (HumanoidBench's EGL viewer) raise in their destructors.
	os._exit(0)
