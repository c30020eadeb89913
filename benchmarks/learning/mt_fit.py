"""
Multitask world-model fit on real transitions: where MoE is supposed to help (MOORE's claim is about
interference between tasks). Real transitions of several DMC tasks of upstream's mt30 set are recorded
through upstream's own environments (`wm_fit.record`: seeded uniformly random actions; cached under
`work/`, not committed), put in upstream's multitask layout (observations zero-padded to mt30's 24,
actions to its 6, the task's mt30 index), and each variant (`variants.VARIANTS` on a `task=mt30` agent)
trains on the same batches in the same order, each update being upstream's own `TDMPC2._update`
(multitask: action masks, task embedding). Held-out losses (upstream's consistency, reward and value
losses on windows of episodes no variant trains on) per task and overall, per model seed; ms per update
is the median process CPU time (one torch thread).

	TDMPC2_ROOT=/root/tdmpc2 OMP_NUM_THREADS=1 python benchmarks/learning/mt_fit.py

Writes `<out>/mt_fit.json` and prints the table; `--from-json PATH` prints the table of a saved result.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import wm_fit  # noqa: E402
from variants import VARIANTS  # noqa: E402

from tdmpc2_moe.upstream import checkout, patching  # noqa: E402

HERE = Path(__file__).resolve().parent
# Six DMC tasks of mt30 with different bodies, observation and action sizes.
TASKS = ("walker-walk", "cheetah-run", "reacher-easy", "cartpole-swingup", "finger-spin", "hopper-stand")
MT30_OBS, MT30_ACTION = 24, 6
COMMON = ["task=mt30", "model_size=1", "device=cpu", "compile=false", "batch_size=64", "monitor_mem_interval=0",
		  "steps=100000"]
LOSSES = wm_fit.LOSSES


def record_multitask(tasks, episodes, steps, seed, tdmpc2, cache_dir):
	"""
	Returns {obs [T, N, steps+1, 24], action [T, N, steps, 6], reward [T, N, steps], index [T] (mt30 task
	indices), action_dims [T]} for `tasks`, each recorded by `wm_fit.record` and zero-padded to mt30's sizes.
	"""
	checkout.activate(tdmpc2)
	from common import TASK_SET
	mt30 = list(TASK_SET["mt30"])
	obs, action, reward, dims = [], [], [], []
	for task in tasks:
		cache = None if cache_dir is None else Path(cache_dir) / f"transitions-{task}-{episodes}x{steps}-seed{seed}.pt"
		data = wm_fit.record(task, episodes, steps, seed, tdmpc2, cache)
		o, a = data["obs"], data["action"]
		obs.append(torch.nn.functional.pad(o, (0, MT30_OBS - o.shape[-1])))
		action.append(torch.nn.functional.pad(a, (0, MT30_ACTION - a.shape[-1])))
		reward.append(data["reward"])
		dims.append(a.shape[-1])
	return dict(obs=torch.stack(obs), action=torch.stack(action), reward=torch.stack(reward),
				index=torch.tensor([mt30.index(t) for t in tasks]), action_dims=dims)


def windows(data, episodes, count, horizon, seed):
	"""
	Returns `count` windows drawn uniformly over the tasks and the listed `episodes` of each, in
	upstream's multitask batch layout: (obs, action, reward, terminated) as `wm_fit.windows`, and the
	mt30 task index of each window [count].
	"""
	g = torch.Generator().manual_seed(seed)
	t = torch.randint(data["obs"].shape[0], (count,), generator=g)
	per_task = [wm_fit.windows({k: data[k][i] for k in ("obs", "action", "reward")}, episodes, count, horizon,
							   seed + 1000 * i) for i in range(data["obs"].shape[0])]
	# Window n comes from task t[n]: entry n of that task's windows ([T, L, count, D] indexed by (t, n)).
	n = torch.arange(count)
	picked = [torch.stack([w[j] for w in per_task]).permute(0, 2, 1, 3)[t, n].transpose(0, 1).contiguous()
			  for j in range(4)]
	return (*picked, data["index"][t])


def build_agent(variant, data, seed, tdmpc2):
	"""Returns a patched mt30 agent of `variant` with upstream's real action dims (its make_env), torch seeded first."""
	patching.patch()
	cfg = checkout.load_cfg([*COMMON, f"seed={seed}", *VARIANTS[variant]], tdmpc2)
	cfg.obs_shape, cfg.action_dim = {"state": (MT30_OBS,)}, MT30_ACTION
	cfg.action_dims, cfg.episode_lengths = list(_mt30_dims(tdmpc2)), [data["action"].shape[2]] * len(cfg.tasks)
	cfg.episode_length, cfg.seed_steps = data["action"].shape[2], data["action"].shape[2]
	from tdmpc2 import TDMPC2
	torch.manual_seed(seed)
	return TDMPC2(cfg)


_DIMS = {}


def _mt30_dims(tdmpc2):
	# Every mt30 task's action size, as upstream's make_multitask_env reports them (30 environments, about 10 s once).
	if "mt30" not in _DIMS:
		os.environ.setdefault("MUJOCO_GL", "egl")
		cfg = checkout.load_cfg(["task=mt30", "model_size=1"], tdmpc2)
		from envs import make_env
		make_env(cfg)
		_DIMS["mt30"] = list(cfg.action_dims)
	return _DIMS["mt30"]


def held_out(agent, tests, seed):
	"""Returns {task name: losses, "overall": mean over tasks} on each task's held-out windows."""
	per_task = {name: wm_fit.held_out_losses(agent, batch[:4], seed, task=batch[4]) for name, batch in tests.items()}
	per_task["overall"] = {k: statistics.fmean(v[k] for v in per_task.values()) for k in LOSSES}
	return per_task


def fit(variant, data, tests, train_episodes, updates, seed, tdmpc2):
	"""Trains `variant` for `updates` upstream updates on the shared batches; returns {final: held_out(...), ms_per_update}."""
	agent = build_agent(variant, data, seed, tdmpc2)
	cfg = agent.cfg
	train = windows(data, train_episodes, updates * cfg.batch_size, cfg.horizon, seed)
	cpu = []
	for i in range(updates):
		sl = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
		obs, action, reward, terminated = (x[:, sl].contiguous() for x in train[:4])
		c = time.process_time()
		agent._update(obs, action, reward, terminated, task=train[4][sl])
		cpu.append(time.process_time() - c)
	return dict(final=held_out(agent, tests, seed), ms_per_update=1000 * statistics.median(cpu) if cpu else None)


def benchmark(tasks=TASKS, episodes=6, held_out_episodes=1, steps=500, updates=300, held_out_windows=256,
			  variants=("plain", "moe", "matched", "fork"), seed=1, model_seeds=(1, 2, 3), tdmpc2=None,
			  cache_dir=None, echo=print):
	"""Records (or loads) the tasks, fits every variant once per model seed; returns {settings, variants: {name: {seeds, final, ms}}}."""
	threads = torch.get_num_threads()
	torch.set_num_threads(1)
	try:
		data = record_multitask(tasks, episodes, steps, seed, tdmpc2, cache_dir)
		horizon = checkout.compose(["model_size=1"], tdmpc2).horizon
		test_eps = range(episodes - held_out_episodes, episodes)
		tests = {}
		for i, name in enumerate(tasks):
			one = {k: data[k][i] for k in ("obs", "action", "reward")}
			batch = wm_fit.windows(one, test_eps, held_out_windows, horizon, seed + 1 + i)
			tests[name] = (*batch, data["index"][i].repeat(held_out_windows))
		out = dict(settings=dict(tasks=list(tasks), episodes=episodes, held_out_episodes=held_out_episodes, steps=steps,
								 updates=updates, held_out_windows=held_out_windows, seed=seed,
								 model_seeds=list(model_seeds), common=COMMON,
								 variants={v: VARIANTS[v] for v in variants},
								 backend=__import__("tdmpc2_moe").backend(), torch=torch.__version__), variants={})
		for name in variants:
			t0 = time.time()
			fits = {}
			for model_seed in model_seeds:
				try:
					fits[str(model_seed)] = fit(name, data, tests, range(episodes - held_out_episodes), updates,
												model_seed, tdmpc2)
				finally:
					patching.unpatch()
			finals = [f["final"] for f in fits.values()]
			out["variants"][name] = dict(
				seeds=fits, ms_per_update=statistics.median(f["ms_per_update"] for f in fits.values()),
				final={t: {k: statistics.fmean(f[t][k] for f in finals) for k in LOSSES} for t in finals[0]},
				final_range={t: {k: [min(f[t][k] for f in finals), max(f[t][k] for f in finals)] for k in LOSSES}
							 for t in finals[0]})
			overall = out["variants"][name]["final"]["overall"]
			echo(f"{name}: held-out overall " + ", ".join(f"{k} {overall[k]:.4f}" for k in LOSSES)
				 + f" (mean of {len(fits)} seeds), {out['variants'][name]['ms_per_update']:.1f} ms/update "
				 f"({time.time() - t0:.0f} s)")
		return out
	finally:
		torch.set_num_threads(threads)


def table(result):
	"""Returns the markdown table: held-out losses per task and overall, mean over model seeds (min to max), ms per update."""
	variants = result["variants"]
	plain = variants.get("plain", {}).get("ms_per_update")
	rows = ["| task | variant | consistency | reward | value | ms / update (CPU) |", "|---|---|---|---|---|---|"]
	for task in [*result["settings"]["tasks"], "overall"]:
		for name, r in variants.items():
			cells = []
			for k in LOSSES:
				low, high = r["final_range"][task][k]
				cells.append(f"{r['final'][task][k]:.4f} ({low:.4f} to {high:.4f})")
			speed = f"{r['ms_per_update']:.1f}" + (f" ({r['ms_per_update'] / plain:.2f}x)" if plain else "")
			rows.append(f"| {task} | {name} | {' | '.join(cells)} | {speed if task == 'overall' else ''} |")
	return "\n".join(rows)


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
	parser.add_argument("--tdmpc2", default=os.environ.get(checkout.ENV_VAR), help="TD-MPC2 checkout (default $TDMPC2_ROOT)")
	parser.add_argument("--tasks", nargs="+", default=list(TASKS))
	parser.add_argument("--episodes", type=int, default=6, help="recorded episodes per task, held-out ones included")
	parser.add_argument("--steps", type=int, default=500)
	parser.add_argument("--updates", type=int, default=300)
	parser.add_argument("--model-seeds", nargs="+", type=int, default=[1, 2, 3])
	parser.add_argument("--variants", nargs="+", default=["plain", "moe", "matched", "fork"])
	parser.add_argument("--out", default=str(HERE / "wm_fit"))
	parser.add_argument("--from-json", metavar="PATH", help="the table of a saved result, without fitting")
	args = parser.parse_args(argv)
	if args.from_json:
		print(table(json.loads(Path(args.from_json).read_text())))
		return 0
	if not args.tdmpc2:
		parser.error(f"--tdmpc2 (or ${checkout.ENV_VAR}) must name a TD-MPC2 checkout")
	for name in args.variants:
		if name not in VARIANTS:
			parser.error(f"--variants: unknown variant {name!r}; variants are {list(VARIANTS)}")
	result = benchmark(args.tasks, args.episodes, 1, args.steps, args.updates, variants=args.variants,
					   model_seeds=args.model_seeds, tdmpc2=args.tdmpc2, cache_dir=HERE / "work")
	out = Path(args.out)
	out.mkdir(parents=True, exist_ok=True)
	(out / "mt_fit.json").write_text(json.dumps(result, indent=1) + "\n")
	print(table(result))
	return 0


if __name__ == "__main__":
	sys.exit(main())
