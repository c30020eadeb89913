"""GateHistory: a fixed-size ring of dense routing vectors, kept on the model's device."""
import torch
import torch.nn as nn

from ..settings.checks import check_int
from .routing_stats import summarize


class GateHistory(nn.Module):
	"""
	Ring buffer of the last `capacity` dense routing vectors ([E] each, the top-k weights scattered
	into their experts' slots). `topk_gate(..., history=h)` writes into it on the device and advances
	the device-side cursor, so recording needs no host synchronisation and never grows.
	Memory: capacity * E * element size, whatever the number of steps.
	Buffers are non-persistent: the ring is a diagnostic, not part of a checkpoint.
	"""

	def __init__(self, capacity, n_experts, device=None, dtype=torch.float32):
		super().__init__()
		check_int("capacity", capacity, 1)
		check_int("n_experts", n_experts, 1, 1024)
		if dtype not in (torch.float32, torch.float16, torch.bfloat16):
			raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
		self.capacity = capacity
		self.n_experts = n_experts
		self.register_buffer("ring", torch.zeros(capacity, n_experts, device=device, dtype=dtype), persistent=False)
		self.register_buffer("cursor", torch.zeros((), device=device, dtype=torch.int64), persistent=False)

	def _apply(self, fn, recurse=True):
		# Module-wide casts (block.double(), model.half()) move the ring but keep its dtype: the
		# kernel writes float32/float16/bfloat16 rings, and the ring's precision is chosen here.
		dtype = self.ring.dtype
		super()._apply(fn, recurse)
		if self.ring.dtype != dtype:
			self.ring = self.ring.to(dtype)
		return self

	@property
	def device(self):
		return self.ring.device

	@property
	def total(self):
		"""Returns the number of rows recorded since creation or the last `clear()` (reads the device cursor)."""
		return int(self.cursor.item())

	def clear(self):
		"""Forgets every recorded row, in place (the ring keeps its storage)."""
		self.ring.zero_()
		self.cursor.zero_()

	def snapshot(self):
		"""Returns a CPU float tensor [min(total, capacity), E] of the recorded rows, oldest first."""
		total = self.total
		if total <= self.capacity:
			rows = self.ring[:total]
		else:
			start = total % self.capacity
			rows = torch.cat([self.ring[start:], self.ring[:start]])
		# A copy even on the CPU (where .float().cpu() of a float32 ring would be a view the next forward overwrites).
		return rows.to("cpu", torch.float32, copy=True)

	def stats(self, last=None):
		"""
		Returns per-expert statistics over the latest `last` recorded rows (every row in the ring when
		None), as device tensors (no host sync): `usage` [E] share of routing slots per expert,
		`mean_weight` [E] mean routing weight, `entropy` [] mean routing entropy (nats), `max_load` []
		largest usage share, `rows` [] rows used (routing_stats.py). A small `last` reads only that many
		rows back.
		"""
		last = self.capacity if last is None else min(check_int("last", last, 1), self.capacity)
		back = torch.arange(1, last + 1, device=self.device)
		w = self.ring.index_select(0, torch.remainder(self.cursor - back, self.capacity)).float()
		w = w * (back <= self.cursor).unsqueeze(-1)  # slots not written yet count nothing
		return summarize(w, rows=torch.clamp(self.cursor, max=last))

	def extra_repr(self):
		return f"capacity={self.capacity}, n_experts={self.n_experts}, dtype={self.ring.dtype}"
