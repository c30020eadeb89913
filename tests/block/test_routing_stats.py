"""
routing_stats.py, the one place routing statistics are computed: their values on a hand-checked case,
the top-k form equal to the dense one, sums that combine across row sets (as ranks do), and every user
of it (ring, latest batch without history) giving the same statistics for the same rows.
"""
import math

import torch

from tdmpc2_moe.block.moe import MoEBlock
from tdmpc2_moe.ops.reference import dense_routing
from tdmpc2_moe.block.routing_stats import from_sums, statistic_sums, summarize, topk_statistic_sums


def test_values_of_a_hand_checked_case():
	w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the last row: an unfilled ring slot
	s = summarize(w, rows=2)
	torch.testing.assert_close(s["usage"], torch.tensor([2 / 3, 1 / 3, 0.0]))
	torch.testing.assert_close(s["mean_weight"], torch.tensor([0.75, 0.25, 0.0]))
	torch.testing.assert_close(s["entropy"], torch.tensor(math.log(2) / 2))
	assert float(s["max_load"]) == float(s["usage"].max()) and s["rows"] == 2
	empty = summarize(torch.zeros(0, 3))
	assert empty["rows"] == 0 and torch.equal(empty["usage"], torch.zeros(3)) and float(empty["entropy"]) == 0.0


def test_top_k_form_equals_the_dense_form():
	g = torch.Generator().manual_seed(0)
	weights = torch.softmax(torch.randn(50, 3, generator=g), -1)
	indices = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(50)])
	dense = statistic_sums(dense_routing(weights, indices, 8))
	compact = topk_statistic_sums(weights, indices, 8)
	for key in dense:
		torch.testing.assert_close(compact[key], dense[key])


def test_sums_of_row_sets_combine_into_the_statistics_of_their_union():
	g = torch.Generator().manual_seed(1)
	a, b = torch.rand(7, 4, generator=g), torch.rand(12, 4, generator=g)
	sa, sb = statistic_sums(a), statistic_sums(b)
	combined = from_sums({k: sa[k] + sb[k] for k in sa}, 19)
	whole = summarize(torch.cat([a, b]))
	for key in ("usage", "mean_weight", "entropy", "max_load"):
		torch.testing.assert_close(combined[key], whole[key])


def test_ring_and_latest_batch_give_the_same_statistics_for_the_same_rows():
	torch.manual_seed(0)
	with_ring = MoEBlock(6, [8], 3, n_experts=5, top_k=2, history_rows=64)
	without = MoEBlock(6, [8], 3, n_experts=5, top_k=2, history_rows=None)
	without.load_state_dict(with_ring.state_dict())
	x = torch.randn(20, 6)
	with_ring(x)
	without(x)
	ring, latest = with_ring.stats(), without.stats()
	for key in ("usage", "mean_weight", "entropy", "max_load", "rows"):
		torch.testing.assert_close(latest[key], ring[key], check_dtype=False)
