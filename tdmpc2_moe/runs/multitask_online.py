"""
Online training of a multitask agent over a task set of the user's (`task=<name> tasks=[t1,t2,...]`,
families/task_sets.py; docs/design.md 21). Upstream trains multitask agents offline only (its
OfflineTrainer reads the mt30/mt80 datasets and refuses any other set); here the agent collects its own
data, with upstream's OnlineTrainer's loop and these differences:
- episode i plays task i mod n (round-robin: every task gets the same share of the data, and a seeded
  run repeats); the agent acts with that task's index and every buffer entry carries it (`task`, as
  upstream's multitask datasets do);
- the seed phase's random actions are zero past the task's own action dimensions, as upstream's datasets
  store them (the planner and the policy mask them so too);
- updates wait for the buffer's first episode (a short `seed_steps` cannot make the first update read an
  empty buffer);
- each evaluation plays `eval_episodes` episodes of every task; `episode_reward` (upstream's eval.csv
  column) is the mean over the tasks, `episode_reward+<task>` and `episode_success+<task>` each task's.
"""
import numpy as np
import torch


def online_multitask_trainer(online_trainer):
	"""Returns a subclass of upstream's `OnlineTrainer` class that trains a multitask agent online (the module docstring)."""

	class OnlineMultitaskTrainer(online_trainer):
		"""Upstream's OnlineTrainer over every task of cfg.tasks, round-robin per episode."""

		def _action_mask(self, task):
			mask = torch.zeros(self.cfg.action_dim)
			mask[:self.cfg.action_dims[task]] = 1
			return mask

		def to_td(self, obs, action=None, reward=None, terminated=None, task=0):
			"""Upstream's step entry with the task index added (int32, as upstream's multitask datasets)."""
			td = super().to_td(obs, action, reward, terminated)
			td["task"] = torch.tensor([task], dtype=torch.int32)
			return td

		def eval(self):
			"""Plays cfg.eval_episodes episodes of every task; returns the mean over tasks and each task's."""
			results, rewards, successes = {}, [], []
			for index, name in enumerate(self.cfg.tasks):
				task_rewards, task_successes = [], []
				for _ in range(self.cfg.eval_episodes):
					obs, done, total, t = self.env.reset(index), False, 0.0, 0
					while not done:
						torch.compiler.cudagraph_mark_step_begin()
						action = self.agent.act(obs, t0=t == 0, eval_mode=True, task=index)
						obs, reward, done, info = self.env.step(action)
						total += float(reward)
						t += 1
					task_rewards.append(total)
					task_successes.append(float(info["success"]))
				results[f"episode_reward+{name}"] = np.nanmean(task_rewards)
				results[f"episode_success+{name}"] = np.nanmean(task_successes)
				rewards.append(results[f"episode_reward+{name}"])
				successes.append(results[f"episode_success+{name}"])
			return dict(episode_reward=np.nanmean(rewards), episode_success=np.nanmean(successes), **results)

		def train(self):
			"""Trains for cfg.steps environment steps, evaluating every cfg.eval_freq (upstream's loop, per-task)."""
			cfg, env, agent, buffer, logger = self.cfg, self.env, self.agent, self.buffer, self.logger
			train_metrics, done, eval_next, task = {}, True, False, 0
			while self._step <= cfg.steps:
				if self._step % cfg.eval_freq == 0:
					eval_next = True
				if done:
					if eval_next:
						eval_metrics = self.eval()
						eval_metrics.update(self.common_metrics())
						logger.log(eval_metrics, "eval")
						eval_next = False
					if self._step > 0:
						if info["terminated"] and not cfg.episodic:
							raise ValueError(f"task {cfg.tasks[task]} terminated, but the run is not episodic: "
											 "train it with episodic=true")
						train_metrics.update(
							episode_reward=torch.tensor([td["reward"] for td in self._tds[1:]]).sum(),
							episode_success=info["success"], episode_length=len(self._tds),
							episode_terminated=info["terminated"])
						train_metrics.update(self.common_metrics())
						logger.log(train_metrics, "train")
						self._ep_idx = buffer.add(torch.cat(self._tds))
					task = self._ep_idx % len(cfg.tasks)
					obs = env.reset(task)
					self._tds = [self.to_td(obs, task=task)]

				if self._step > cfg.seed_steps:
					action = agent.act(obs, t0=len(self._tds) == 1, task=task)
				else:
					action = env.rand_act() * self._action_mask(task)
				obs, reward, done, info = env.step(action)
				self._tds.append(self.to_td(obs, action, reward, info["terminated"], task=task))

				if self._step >= cfg.seed_steps and buffer.num_eps > 0:
					if self._step == cfg.seed_steps:
						num_updates = cfg.seed_steps
						print("Pretraining agent on seed data...")
					else:
						num_updates = 1
					for _ in range(num_updates):
						train_metrics.update(agent.update(buffer))
				self._step += 1
			logger.finish(agent)

	return OnlineMultitaskTrainer
