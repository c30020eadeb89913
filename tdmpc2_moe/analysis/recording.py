"""
Recording evaluation episodes for `tdmpc2-moe play`: `GateRecorder` keeps, per MoE head and step, the
gate's routing vector on the real observation and the mean over the planner's ring rows, in device
buffers copied to the host once per episode; `VideoWriter` streams rendered frames to an mp4.
"""
import os

import numpy as np
import torch

from ..ops.reference import dense_routing
from ..settings.checks import first_line
from ..block.routing_stats import summarize


class GateRecorder:
	"""
	Per-head device buffers for one episode of at most `steps` steps: routing weights on the real
	observation [steps, E], planner mean weights [steps, E] and planner mean entropy [steps].
	"""

	def __init__(self, blocks, steps, device):
		self.blocks = blocks
		self.weights = {h: torch.zeros(steps, b.n_experts, device=device) for h, b in blocks.items()}
		self.plan = {h: torch.zeros(steps, b.n_experts, device=device) for h, b in blocks.items() if b.history is not None}
		self.plan_entropy = {h: torch.zeros(steps, device=device) for h in self.plan}
		self._before = {}

	def before_act(self):
		"""Remembers each ring's cursor (a device copy, no sync) before the planner runs."""
		self._before = {h: self.blocks[h].history.cursor.clone() for h in self.plan}

	def after_act(self, t):
		"""Stores at row `t` the mean routing vector and entropy of the ring rows written since `before_act`."""
		for h in self.plan:
			history = self.blocks[h].history
			cap = history.capacity
			written = torch.clamp(history.cursor - self._before[h], max=cap)
			# Ring slot p holds a row of this step when it is among the `written` slots after the old cursor.
			age = torch.remainder(torch.arange(cap, device=history.device) - self._before[h], cap)
			mask = (age < written).unsqueeze(-1)
			stats = summarize(history.ring.float() * mask, rows=written)
			self.plan[h][t] = stats["mean_weight"]
			self.plan_entropy[h][t] = stats["entropy"]

	@torch.no_grad()
	def probe(self, t, model, obs, action, task):
		"""Stores at row `t` each head's routing vector for the real observation `obs` [1, ...] and `action` [1, A]."""
		multitask = model.cfg.multitask
		x = model.task_emb(obs, task) if multitask else obs
		z = model.encode(obs, task)
		zt = model.task_emb(z, task) if multitask else z
		inputs = {"encoder": x, "pi": zt, "termination": zt,
				  "dynamics": torch.cat([zt, action], -1), "reward": torch.cat([zt, action], -1)}
		for h, block in self.blocks.items():
			gate = block.route(inputs[h])  # the block's gate columns and current (adaptive) temperature
			self.weights[h][t] = dense_routing(gate.weights, gate.indices, block.n_experts)[0]

	def row(self, t):
		"""Returns {head: (weights [E], planner mean [E] or None)} of step `t` on the host (for printing)."""
		return {h: (self.weights[h][t].cpu(), self.plan[h][t].cpu() if h in self.plan else None) for h in self.blocks}

	def finish(self, steps):
		"""Returns {head: {weights, plan_weights, plan_entropy}} numpy arrays of the first `steps` rows (one copy)."""
		out = {}
		for h in self.blocks:
			out[h] = {"weights": self.weights[h][:steps].cpu().numpy()}
			if h in self.plan:
				out[h]["plan_weights"] = self.plan[h][:steps].cpu().numpy()
				out[h]["plan_entropy"] = self.plan_entropy[h][:steps].cpu().numpy()
		return out


class VideoWriter:
	"""Streams rendered frames into an mp4 with imageio; after the first failure it only reports why."""

	def __init__(self, path, fps=15):
		self.path, self.fps = path, fps
		self.problem = None
		self._writer = None
		try:
			import imageio  # noqa: F401
			import imageio_ffmpeg  # noqa: F401
		except ImportError:
			self.problem = "video.mp4 needs imageio and imageio-ffmpeg (pip install imageio imageio-ffmpeg)"

	def add(self, env):
		"""Renders `env` and appends the frame; returns False once recording has failed."""
		if self.problem is not None:
			return False
		try:
			frame = env.render()
			if self._writer is None:
				import imageio
				self._writer = imageio.get_writer(self.path, fps=self.fps, macro_block_size=1)
			self._writer.append_data(np.asarray(frame))
		except Exception as exc:
			self.problem = f"rendering failed ({type(exc).__name__}: {first_line(exc, 200)}); " \
						   "try MUJOCO_GL=egl or MUJOCO_GL=osmesa"
			self.close()
			if os.path.exists(self.path):
				os.remove(self.path)
			return False
		return True

	def close(self):
		"""Finishes the file. Returns the path when a video was written, else None."""
		writer, self._writer = self._writer, None
		if writer is not None:
			writer.close()
			return self.path
		return None
