"""
World-model fit benchmark: the fast, deterministic companion to the learning runs. Real transitions
of a DMC task are recorded once (upstream's `make_env`, uniformly random actions from a seeded
generator) and cached; then plain TD-MPC2 and each MoE variant (`variants.VARIANTS`) train on the
same batches, in the same order, for the same number of updates, each update being upstream's own
`TDMPC2._update` (consistency, reward and value losses, policy step, target update) through the
patched agent. Held-out losses are upstream's three losses computed on windows of episodes the
models never train on; time per update is the median process CPU time of `_update` (one torch
thread; wall time is recorded too).

	TDMPC2_ROOT=/root/tdmpc2 OMP_NUM_THREADS=1 python benchmarks/learning/wm_fit.py --task walker-walk

Writes `<out>/<task>.json` (settings, per-variant held-out curve, final losses, ms per update) and
`<out>/<task>.png` (held-out losses against updates) and prints the table; `--from-json PATH`
redraws both from a saved result. A variant whose setting this tdmpc2_moe does not know yet (`moe_preset=fork`
before it exists) is skipped with a message.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from variants import VARIANTS  # noqa: E402

from tdmpc2_moe.upstream import checkout, patching  # noqa: E402

HERE = Path(__file__).resolve().parent
# The agent every variant shares: the learning runs' model (upstream's smallest) and batch size.
COMMON = ["model_size=1", "device=cpu", "compile=false", "batch_size=64", "monitor_mem_interval=0"]
LOSSES = ("consistency", "reward", "value")


def record(task, episodes, steps, seed, tdmpc2=None, cache=None):
	"""
	Returns {obs [N, steps+1, obs_dim], action [N, steps, act_dim], reward [N, steps]} of `episodes`
	episodes of `task` with uniformly random actions in [-1, 1] (torch generator seeded with `seed`,
	environment seeded with `seed` as upstream does). Loaded from `cache` when it holds the same
	recording, else recorded and saved there.
	"""
	key = dict(task=task, episodes=episodes, steps=steps, seed=seed)
	if cache is not None and Path(cache).is_file():
		data = torch.load(cache, weights_only=True)
		if data.get("key") == key:
			return data
	# As upstream's train.py: dm_control otherwise tries GLFW, which needs a display.
	os.environ.setdefault("MUJOCO_GL", "egl")
	checkout.activate(tdmpc2)
	cfg = checkout.load_cfg([f"task={task}", f"seed={seed}", "model_size=1", "steps=1000"], tdmpc2)
	from envs import make_env
	env = make_env(cfg)
	g = torch.Generator().manual_seed(seed)
	obs, actions, rewards = [], [], []
	for _ in range(episodes):
		o = [env.reset()]
		a, r = [], []
		for _ in range(steps):
			act = torch.rand(cfg.action_dim, generator=g) * 2 - 1
			ob, rew, _, _ = env.step(act)
			o.append(ob)
			a.append(act)
			r.append(rew)
		obs.append(torch.stack(o))
		actions.append(torch.stack(a))
		rewards.append(torch.stack(r).float())
	data = dict(key=key, obs=torch.stack(obs), action=torch.stack(actions), reward=torch.stack(rewards))
	if cache is not None:
		Path(cache).parent.mkdir(parents=True, exist_ok=True)
		torch.save(data, cache)
	return data


def windows(data, episodes, count, horizon, seed):
	"""
	Returns `count` windows of `horizon` transitions from the listed `episodes`, in upstream's batch
	layout (what `Buffer.sample` gives `_update`): obs [horizon+1, count, obs_dim], action
	[horizon, count, act_dim], reward and terminated [horizon, count, 1]. Starts drawn with a
	generator seeded with `seed`.
	"""
	g = torch.Generator().manual_seed(seed)
	episodes = torch.as_tensor(episodes)
	ep = episodes[torch.randint(len(episodes), (count,), generator=g)]
	start = torch.randint(data["action"].shape[1] - horizon + 1, (count,), generator=g)
	offsets = torch.arange(horizon + 1)
	idx = start[None, :] + offsets[:, None]
	obs = data["obs"][ep[None, :], idx]
	action = data["action"][ep[None, :], idx[:-1]]
	reward = data["reward"][ep[None, :], idx[:-1]].unsqueeze(-1)
	return obs.contiguous(), action.contiguous(), reward.contiguous(), torch.zeros_like(reward)


@torch.no_grad()
def held_out_losses(agent, batch, seed=0, task=None):
	"""
	Returns {consistency, reward, value}: upstream's three world-model losses as `_update` defines them
	(rho-discounted over the horizon, divided by the horizon, and by num_q for the value), on `batch`
	without a gradient step; `task` ([count] task indices) for a multitask agent. Seeds torch with
	`seed` for the policy sample in the TD target.
	"""
	from common import math
	cfg, model = agent.cfg, agent.model
	obs, action, reward, terminated = batch
	torch.manual_seed(seed)
	model.eval()
	next_z = model.encode(obs[1:], task)
	td_targets = agent._td_target(next_z, reward, terminated, task)
	z = model.encode(obs[0], task)
	zs, consistency = [z], 0.0
	for t in range(cfg.horizon):
		z = model.next(z, action[t], task)
		consistency += F.mse_loss(z, next_z[t]).item() * cfg.rho ** t
		zs.append(z)
	zs = torch.stack(zs[:-1])
	qs = model.Q(zs, action, task, return_type="all")
	reward_preds = model.reward(zs, action, task)
	reward_loss = value_loss = 0.0
	for t in range(cfg.horizon):
		reward_loss += math.soft_ce(reward_preds[t], reward[t], cfg).mean().item() * cfg.rho ** t
		for q in range(cfg.num_q):
			value_loss += math.soft_ce(qs[q, t], td_targets[t], cfg).mean().item() * cfg.rho ** t
	return dict(consistency=consistency / cfg.horizon, reward=reward_loss / cfg.horizon,
				value=value_loss / (cfg.horizon * cfg.num_q))


def build_agent(variant, task, data, seed, tdmpc2=None):
	"""Returns a patched upstream TDMPC2 agent of `variant` for `data`'s shapes (torch seeded with `seed` first)."""
	patching.patch()
	cfg = checkout.load_cfg([f"task={task}", f"seed={seed}", "steps=100000", *COMMON, *VARIANTS[variant]], tdmpc2)
	cfg.obs_shape = {"state": tuple(data["obs"].shape[-1:])}
	cfg.action_dim = data["action"].shape[-1]
	cfg.episode_length = data["action"].shape[1]
	cfg.seed_steps = cfg.episode_length
	from tdmpc2 import TDMPC2
	torch.manual_seed(seed)
	return TDMPC2(cfg)


def fit(variant, task, data, train_episodes, test, updates, eval_every, seed, tdmpc2=None):
	"""
	Trains `variant` for `updates` upstream updates on batches from `train_episodes` (the same for
	every variant: drawn with `seed`), evaluating on the `test` windows every `eval_every` updates.
	Returns {curve: [{update, consistency, reward, value}], final: the last curve point, train: the
	last update's training losses, ms_per_update / wall_ms_per_update: medians in process CPU time
	(steady on a shared machine, where wall time also counts other jobs' turns) and wall time}.
	"""
	agent = build_agent(variant, task, data, seed, tdmpc2)
	cfg = agent.cfg
	train = windows(data, train_episodes, updates * cfg.batch_size, cfg.horizon, seed)
	curve, wall, cpu, info = [], [], [], {}
	for i in range(updates + 1):
		if i % eval_every == 0 or i == updates:
			curve.append(dict(update=i, **held_out_losses(agent, test, seed)))
		if i == updates:
			break
		sl = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
		batch = [x[:, sl].contiguous() for x in train]
		w, c = time.perf_counter(), time.process_time()
		info = agent._update(*batch)
		wall.append(time.perf_counter() - w)
		cpu.append(time.process_time() - c)
	train_losses = {k: float(info[f"{k}_loss"]) for k in LOSSES} if info else {}
	return dict(curve=curve, final=curve[-1], train=train_losses,
				ms_per_update=1000 * statistics.median(cpu) if cpu else None,
				wall_ms_per_update=1000 * statistics.median(wall) if wall else None)


def benchmark(task="walker-walk", episodes=12, held_out=2, steps=500, updates=400, eval_every=50,
			  held_out_windows=1024, variants=tuple(VARIANTS), seed=1, model_seeds=(1,), tdmpc2=None, cache=None,
			  echo=print):
	"""
	Records (or loads) the transitions (seeded with `seed`) and fits every variant once per model seed
	(initialisation, training batches and policy noise; the recording and held-out windows stay the
	same); returns {settings, variants: {name: `summarise` of the fits, or {skipped: reason}}}. Runs
	with one torch thread for the duration.
	"""
	for name in variants:
		if name not in VARIANTS:
			raise ValueError(f"variants: unknown variant {name!r}; variants are {list(VARIANTS)}")
	from hydra.errors import HydraException
	threads = torch.get_num_threads()
	torch.set_num_threads(1)
	try:
		data = record(task, episodes, steps, seed, tdmpc2, cache)
		horizon = checkout.compose(["model_size=1"], tdmpc2).horizon
		n = data["obs"].shape[0]
		if not 1 <= held_out < n:
			raise ValueError(f"held_out must be between 1 and episodes - 1 ({n - 1}), got {held_out}")
		# Windows of the last `held_out` episodes, which no variant trains on.
		test = windows(data, range(n - held_out, n), held_out_windows, horizon, seed + 1)
		out = dict(settings=dict(task=task, episodes=episodes, held_out=held_out, steps=steps, updates=updates,
								 eval_every=eval_every, held_out_windows=held_out_windows, seed=seed,
								 model_seeds=list(model_seeds),
								 common=COMMON, variants={v: VARIANTS[v] for v in variants},
								 backend=__import__("tdmpc2_moe").backend(), torch=torch.__version__),
				   variants={})
		for name in variants:
			t0 = time.time()
			try:
				fits = {}
				for model_seed in model_seeds:
					fits[str(model_seed)] = fit(name, task, data, range(n - held_out), test, updates, eval_every,
												model_seed, tdmpc2)
					patching.unpatch()
			except (HydraException, ValueError) as exc:
				key = VARIANTS[name][0]
				if key.split("=")[0] not in str(exc):
					raise
				out["variants"][name] = dict(skipped=f"this tdmpc2_moe does not know {key} yet "
															f"({str(exc).splitlines()[0]})")
				echo(f"{name}: skipped: {out['variants'][name]['skipped']}")
				continue
			finally:
				patching.unpatch()
			r = out["variants"][name] = summarise(fits)
			echo(f"{name}: held-out " + ", ".join(f"{k} {r['final'][k]:.4f}" for k in LOSSES)
				 + f" (mean of {len(fits)} seeds), {r['ms_per_update']:.1f} ms/update ({time.time() - t0:.0f} s)")
		return out
	finally:
		torch.set_num_threads(threads)


def summarise(fits):
	"""
	Returns {seeds: {seed: fit result}, final: {loss: mean over seeds}, final_range: {loss: [min, max]},
	ms_per_update, wall_ms_per_update: medians over the seeds' medians}.
	"""
	finals = [f["final"] for f in fits.values()]
	return dict(seeds=fits,
				final={k: statistics.fmean(f[k] for f in finals) for k in LOSSES},
				final_range={k: [min(f[k] for f in finals), max(f[k] for f in finals)] for k in LOSSES},
				ms_per_update=statistics.median(f["ms_per_update"] for f in fits.values()),
				wall_ms_per_update=statistics.median(f["wall_ms_per_update"] for f in fits.values()))


def table(result):
	"""Returns the markdown table of a `benchmark` result: held-out losses as the mean over model seeds (min to max)."""
	rows = ["| variant | held-out consistency | held-out reward | held-out value | ms / update (CPU) | wall ms | vs plain |",
			"|---|---|---|---|---|---|---|"]
	plain = result["variants"].get("plain", {}).get("ms_per_update")
	for name, r in result["variants"].items():
		if "skipped" in r:
			rows.append(f"| {name} | skipped: {r['skipped'].split(' (')[0]} | | | | | |")
			continue
		cells = []
		for k in LOSSES:
			low, high = r["final_range"][k]
			cells.append(f"{r['final'][k]:.4f}" + (f" ({low:.4f} to {high:.4f})" if len(r["seeds"]) > 1 else ""))
		ratio = f"{r['ms_per_update'] / plain:.2f}x" if plain else ""
		rows.append(f"| {name} | {' | '.join(cells)} | {r['ms_per_update']:.1f} | {r['wall_ms_per_update']:.1f} | {ratio} |")
	return "\n".join(rows)


def plot(result, path):
	"""Draws held-out consistency, reward and value loss against updates (mean over model seeds, min-max band) into PNG `path`."""
	import matplotlib
	matplotlib.use("Agg")
	import matplotlib.pyplot as plt
	fig, axes = plt.subplots(1, len(LOSSES), figsize=(4.5 * len(LOSSES), 3.6))
	for name, r in result["variants"].items():
		if "skipped" in r:
			continue
		fits = list(r["seeds"].values())
		updates = [p["update"] for p in fits[0]["curve"]]
		for ax, k in zip(axes, LOSSES):
			values = [[f["curve"][i][k] for f in fits] for i in range(len(updates))]
			line, = ax.plot(updates, [statistics.fmean(v) for v in values], marker="o", ms=3,
							label=f"{name} ({len(fits)} seed{'s' * (len(fits) > 1)})")
			ax.fill_between(updates, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
							alpha=0.2, lw=0)
	for ax, k in zip(axes, LOSSES):
		ax.set_title(f"held-out {k} loss")
		ax.set_xlabel("updates")
		ax.set_yscale("log")
		ax.grid(alpha=0.3)
		ax.legend()
	fig.suptitle(f"{result['settings']['task']}: mean over model seeds; shaded: min to max", fontsize=9)
	fig.tight_layout()
	fig.savefig(path, dpi=110)
	plt.close(fig)


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
	parser.add_argument("--tdmpc2", default=os.environ.get(checkout.ENV_VAR), help="TD-MPC2 checkout (default $TDMPC2_ROOT)")
	parser.add_argument("--task", default="walker-walk")
	parser.add_argument("--episodes", type=int, default=12, help="recorded episodes, held-out ones included")
	parser.add_argument("--held-out", type=int, default=2, help="last episodes kept out of training")
	parser.add_argument("--steps", type=int, default=500, help="steps per recorded episode")
	parser.add_argument("--updates", type=int, default=400)
	parser.add_argument("--eval-every", type=int, default=50)
	parser.add_argument("--seed", type=int, default=1, help="seed of the recording and the held-out windows")
	parser.add_argument("--model-seeds", nargs="+", type=int, default=[1, 2], help="one fit per variant and seed")
	parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
	parser.add_argument("--out", default=str(HERE / "wm_fit"))
	parser.add_argument("--from-json", metavar="PATH", help="table and plot of a saved result, without fitting")
	args = parser.parse_args(argv)
	if args.from_json:
		result = json.loads(Path(args.from_json).read_text())
		plot(result, Path(args.from_json).with_suffix(".png"))
		print(table(result))
		return 0
	if not args.tdmpc2:
		parser.error(f"--tdmpc2 (or ${checkout.ENV_VAR}) must name a TD-MPC2 checkout")
	out = Path(args.out)
	cache = HERE / "work" / f"transitions-{args.task}-{args.episodes}x{args.steps}-seed{args.seed}.pt"
	result = benchmark(args.task, args.episodes, args.held_out, args.steps, args.updates, args.eval_every,
					   variants=args.variants, seed=args.seed, model_seeds=args.model_seeds, tdmpc2=args.tdmpc2, cache=cache)
	out.mkdir(parents=True, exist_ok=True)
	(out / f"{args.task}.json").write_text(json.dumps(result, indent=1) + "\n")
	plot(result, out / f"{args.task}.png")
	print(table(result))
	return 0


if __name__ == "__main__":
	sys.exit(main())
