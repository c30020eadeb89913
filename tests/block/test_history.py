"""GateHistory: the ring written by topk_gate, its cursor, snapshot order, clear() and stats()."""
import math

import pytest
import torch

from tdmpc2_moe import GateHistory, topk_gate
from tdmpc2_moe.ops.reference import dense_routing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_keeps_the_last_capacity_rows_in_order(dtype, on_device):
	torch.manual_seed(0)
	capacity, e = 64, 8
	history = GateHistory(capacity, e, dtype=dtype)
	written = []
	for n in (10, 50, 100, 3, 61):  # 224 rows = 3.5 capacities; one call has N > capacity
		gate = topk_gate(torch.randn(n, e), 2, history=history)
		written.append(dense_routing(gate.weights, gate.indices, e))
	rows = torch.cat(written)
	assert history.total == 224
	snap = history.snapshot()
	assert snap.device.type == "cpu" and snap.shape == (capacity, e)
	torch.testing.assert_close(snap, rows[-capacity:].to(dtype).float().cpu())


def test_snapshot_before_the_ring_fills_and_after_clear(on_device):
	history = GateHistory(16, 4)
	gate = topk_gate(torch.randn(5, 4), 1, history=history)
	torch.testing.assert_close(history.snapshot(), dense_routing(gate.weights, gate.indices, 4).cpu())
	history.clear()
	assert history.total == 0 and history.snapshot().shape == (0, 4)
	assert (history.ring == 0).all()


def test_stats_on_a_hand_made_case(on_device):
	history = GateHistory(8, 4)
	# k=1 with renormalisation: every row is one-hot, to experts 0, 0, 1, 2.
	logits = torch.tensor([[5.0, 0, 0, 0], [4.0, 1, 0, 0], [0, 3.0, 0, 0], [0, 0, 2.0, 0]])
	topk_gate(logits, 1, history=history)
	s = history.stats()
	torch.testing.assert_close(s["usage"], torch.tensor([0.5, 0.25, 0.25, 0.0]))
	torch.testing.assert_close(s["mean_weight"], torch.tensor([0.5, 0.25, 0.25, 0.0]))
	torch.testing.assert_close(s["entropy"], torch.tensor(0.0))
	torch.testing.assert_close(s["max_load"], torch.tensor(0.5))
	assert int(s["rows"]) == 4
	# Two equal logits with k=2: weights 1/2, 1/2, routing entropy ln 2 for those rows.
	history.clear()
	topk_gate(torch.tensor([[1.0, 1.0, -9.0, -9.0]] * 2), 2, history=history)
	torch.testing.assert_close(history.stats()["entropy"], torch.tensor(math.log(2)))


def test_stats_over_the_latest_rows_after_the_ring_wraps(on_device):
	history = GateHistory(8, 4)
	# 11 one-hot rows (the ring wraps): experts 0 x 7, then 1, 2, 3, 3.
	topk_gate(torch.eye(4)[[0] * 7 + [1, 2, 3, 3]] * 9.0, 1, history=history)
	s = history.stats(last=3)
	torch.testing.assert_close(s["usage"], torch.tensor([0.0, 0.0, 1 / 3, 2 / 3]))
	torch.testing.assert_close(s["max_load"], torch.tensor(2 / 3))
	assert int(s["rows"]) == 3
	# More than the ring holds means the whole ring: the last 8 rows (4 x expert 0, then 1, 2, 3, 3).
	for last in (8, 100, None):
		s = history.stats(last=last)
		torch.testing.assert_close(s["usage"], torch.tensor([0.5, 0.125, 0.125, 0.25]))
		assert int(s["rows"]) == 8
	with pytest.raises(ValueError, match="last"):
		history.stats(last=0)


def test_memory_is_fixed_by_capacity(on_device):
	history = GateHistory(1000, 16)
	for _ in range(20):
		topk_gate(torch.randn(300, 16), 2, history=history)
	assert history.ring.numel() * history.ring.element_size() == 1000 * 16 * 4
	assert history.total == 6000 and history.snapshot().shape == (1000, 16)


def test_module_casts_keep_ring_dtype(on_device):
	# block.double() / model.half() must not turn the ring into a dtype the kernel cannot write.
	h = GateHistory(4, 3, dtype=torch.bfloat16)
	h.double()
	assert h.ring.dtype == torch.bfloat16 and h.cursor.dtype == torch.int64
	h.float()
	assert h.ring.dtype == torch.bfloat16
