"""
AdaptiveTemperature: a gate temperature that follows a target routing entropy (docs/design.md 5a, the
fork's model), kept on the device so that adapting it needs no host synchronisation.
"""
import torch
import torch.nn as nn

from .routing_stats import row_entropy


class AdaptiveTemperature(nn.Module):
	"""
	The gate temperature tau of a router with a target entropy: after each training forward `step()`
	sets tau = clamp(tau + rate * tanh(target - H), low, high), H the batch's mean routing entropy,
	except during the first `freeze` training forwards. Both buffers (`tau` and the count of training
	forwards, `forwards`) are persistent: a checkpoint restores the temperature and where the freeze
	stands. Only tensor ops: no host sync, traceable by torch.compile.
	"""

	def __init__(self, start, target, bounds, rate, freeze):
		super().__init__()
		self.target, self.bounds, self.rate, self.freeze = target, bounds, rate, freeze
		self.register_buffer("tau", torch.tensor(float(start)))
		self.register_buffer("forwards", torch.zeros((), dtype=torch.int64))

	def scale(self, logits):
		"""
		Returns `logits / tau`. topk_gate then runs at temperature 1.0, so the gate sees the same
		softmax(logits / tau) without reading tau on the host; the division is part of the graph and
		the gradient reaches the logits scaled by 1 / tau, as through topk_gate's own temperature.
		"""
		return logits / self.tau.to(logits.dtype)

	@torch.no_grad()
	def step(self, weights):
		"""
		Moves tau towards the target entropy from the routing `weights` [N, k] of a training forward.
		The new tau is a new tensor bound to the buffer's name, not written into the old one: the
		backward of this forward still needs the tau it divided by, and compiled graphs (AOTAutograd)
		save that buffer itself for backward, so an in-place write would hand backward the new value.
		"""
		entropy = row_entropy(weights.to(self.tau.dtype)).sum() / max(weights.shape[0], 1)
		move = self.rate * torch.tanh(self.target - entropy)
		move = torch.where(self.forwards >= self.freeze, move, torch.zeros_like(move))
		self.tau = torch.clamp(self.tau + move, *self.bounds)
		self.forwards.add_(1)

	def extra_repr(self):
		return f"target={self.target}, bounds={self.bounds}, rate={self.rate}, freeze={self.freeze}"
