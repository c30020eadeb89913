"""
Time per update and per `act` of each learning-benchmark variant, with the training runs' settings
(variants.py), measured apart from the runs: a training run's wall time also counts environment
steps, evaluations and whatever else shares the machine, so it cannot say what a variant's update
costs. In this process, on one torch thread, one variant after the other.

	TDMPC2_ROOT=/root/tdmpc2 OMP_NUM_THREADS=1 python benchmarks/learning/measure.py --tasks cartpole-balance walker-stand
	python benchmarks/learning/measure.py --show      # the table of the saved measurements

Writes `measure/<task>.json` ({variant: ms_per_update, ms_per_act (process CPU time), wall_ms_per_update,
wall_ms_per_act, updates, acts, backend}) and prints the table.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from variants import COMMON, VARIANTS  # noqa: E402

HERE = Path(__file__).resolve().parent


def measure(task, variant, tdmpc2, updates=30, acts=100, warmup=5, seed=1):
	"""
	Returns {ms_per_update, ms_per_act} in process CPU time and the same as wall time
	(wall_ms_per_update, wall_ms_per_act): medians of `updates` `agent.update(buffer)` calls on a
	buffer of two random-action episodes of `task`, and of `acts` `agent.act(obs)` planning calls on
	real observations, after `warmup` calls each; or {skipped: reason} when this tdmpc2_moe does not
	know the variant's setting.
	"""
	import torch
	from hydra.errors import HydraException
	from tdmpc2_moe import backend
	from tdmpc2_moe.upstream import checkout, patching
	os.environ.setdefault("MUJOCO_GL", "egl")
	threads = torch.get_num_threads()
	torch.set_num_threads(1)
	patching.patch()
	try:
		try:
			cfg = checkout.load_cfg([f"task={task}", f"seed={seed}", "steps=100000", *COMMON, *VARIANTS[variant]], tdmpc2)
		except HydraException as exc:
			return dict(skipped=f"this tdmpc2_moe does not know {VARIANTS[variant][0]} yet ({str(exc).splitlines()[0]})")
		from envs import make_env
		from common.buffer import Buffer
		from tensordict import TensorDict
		from tdmpc2 import TDMPC2
		env = make_env(cfg)
		torch.manual_seed(seed)
		agent, buffer = TDMPC2(cfg), Buffer(cfg)
		obs_seen = []
		for _ in range(2):
			obs = env.reset()
			rows = [TensorDict(obs=obs[None], action=torch.full((1, cfg.action_dim), float("nan")),
							   reward=torch.full((1,), float("nan")), terminated=torch.full((1,), float("nan")), batch_size=(1,))]
			for _ in range(cfg.episode_length):
				action = torch.rand(cfg.action_dim) * 2 - 1
				obs, reward, _, info = env.step(action)
				obs_seen.append(obs)
				rows.append(TensorDict(obs=obs[None], action=action[None], reward=reward[None],
									   terminated=info["terminated"][None], batch_size=(1,)))
			buffer.add(torch.cat(rows))

		def timed(name, fn, n):
			# Process CPU time besides wall time: on a shared machine wall time also counts other jobs' turns.
			wall, cpu = [], []
			for i in range(n + warmup):
				w, c = time.perf_counter(), time.process_time()
				fn(i)
				wall.append(time.perf_counter() - w)
				cpu.append(time.process_time() - c)
			return {f"ms_per_{name}": 1000 * statistics.median(cpu[warmup:]),
					f"wall_ms_per_{name}": 1000 * statistics.median(wall[warmup:])}
		return dict(**timed("update", lambda i: agent.update(buffer), updates),
					**timed("act", lambda i: agent.act(obs_seen[i], t0=i == 0), acts),
					updates=updates, acts=acts, backend=backend())
	finally:
		patching.unpatch()
		torch.set_num_threads(threads)


def table(found):
	"""Returns the markdown table of {task: {variant: measurement}}: CPU ms per update and per act, and each against plain."""
	rows = ["| task | variant | ms / update | vs plain | ms / act | vs plain | wall ms / update | wall ms / act | backend |",
			"|---|---|---|---|---|---|---|---|---|"]
	for task, variants in found.items():
		plain = variants.get("plain", {})
		for name, m in variants.items():
			if "skipped" in m:
				rows.append(f"| {task} | {name} | skipped: {m['skipped']} |  |  |  |  |  |  |")
				continue
			ratio = {k: f"{m[k] / plain[k]:.2f}x" if k in plain else "-" for k in ("ms_per_update", "ms_per_act")}
			rows.append(f"| {task} | {name} | {m['ms_per_update']:.1f} | {ratio['ms_per_update']} | {m['ms_per_act']:.1f} | "
						f"{ratio['ms_per_act']} | {m['wall_ms_per_update']:.1f} | {m['wall_ms_per_act']:.1f} | {m['backend']} |")
	return "\n".join(rows)


def main(argv=None):
	parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
	parser.add_argument("--tdmpc2", default=os.environ.get("TDMPC2_ROOT"), help="TD-MPC2 checkout (default $TDMPC2_ROOT)")
	parser.add_argument("--tasks", nargs="+", default=["cartpole-balance", "walker-stand"])
	parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
	parser.add_argument("--updates", type=int, default=30)
	parser.add_argument("--acts", type=int, default=100)
	parser.add_argument("--out", default=str(HERE / "measure"))
	parser.add_argument("--show", action="store_true", help="print the table of the saved measurements under --out")
	args = parser.parse_args(argv)
	out = Path(args.out)
	if args.show:
		found = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
		if not found:
			parser.error(f"no measurements under {out}")
		print(table(found))
		return 0
	if not args.tdmpc2:
		parser.error("--tdmpc2 (or $TDMPC2_ROOT) must name a TD-MPC2 checkout")
	out.mkdir(parents=True, exist_ok=True)
	found = {}
	for task in args.tasks:
		found[task] = {name: measure(task, name, Path(args.tdmpc2).resolve(), args.updates, args.acts)
					   for name in args.variants}
		(out / f"{task}.json").write_text(json.dumps(found[task], indent=1) + "\n")
	print(table(found))
	return 0


if __name__ == "__main__":
	sys.exit(main())
