"""
MoEBlock under DistributedDataParallel: 2 CPU processes on gloo against one process on the
concatenated batch (parameters, rank-local gate history and aux loss, all_reduce_stats).
Every collective and the wait for the workers has a timeout, so a hang fails instead of blocking.
"""
import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tdmpc2_moe.block import distributed
from tdmpc2_moe.block.moe import MoEBlock

WORLD, ROWS, STEPS, LR = 2, 16, 4, 0.05
# Every dispatch mode MoEBlock offers ("auto" only picks one of the others).
DISPATCH = ["dense", "sparse"]
# (dispatch, batched, aux_coef, zloss_coef, keep_routing_local, starved): starved gives the gate a
# bias that no row overcomes, so that expert 3 receives no row on any rank.
CASES = [(d, batched, aux, 0.001, True, False) for d in DISPATCH for batched in (False, True) for aux in (0.0, 0.05)]
CASES += [(d, False, 0.0, 0.001, True, True) for d in DISPATCH]
CASES.append((DISPATCH[0], False, 0.0, 0.0, False, False))


def _block(dispatch, batched, aux, zloss, starved):
	torch.manual_seed(0)
	block = MoEBlock(8, [16], 4, n_experts=4, top_k=2, aux_coef=aux, zloss_coef=zloss, history_rows=1024,
					 dispatch=dispatch)
	block.experts.batched = batched
	if starved:
		with torch.no_grad():
			block.gate.bias[3] = -100.0
	return block


def _data():
	"""Returns STEPS (x, y) batches of WORLD * ROWS rows; rank r trains on rows r*ROWS:(r+1)*ROWS."""
	g = torch.Generator().manual_seed(1)
	return [(torch.randn(WORLD * ROWS, 8, generator=g), torch.randn(WORLD * ROWS, 4, generator=g)) for _ in range(STEPS)]


def _worker(rank, port, out_dir):
	torch.set_num_threads(1)
	dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
							timeout=datetime.timedelta(seconds=60))
	results = []
	for dispatch, batched, aux, zloss, local, starved in CASES:
		block = _block(dispatch, batched, aux, zloss, starved)
		if local:
			distributed.keep_routing_local(block)
		model = torch.nn.parallel.DistributedDataParallel(block)
		opt = torch.optim.SGD(model.parameters(), lr=LR)
		missing = set()
		for x, y in _data():
			rows = slice(rank * ROWS, (rank + 1) * ROWS)
			F.mse_loss(model(x[rows]), y[rows]).backward()
			missing |= {n for n, p in block.named_parameters() if p.grad is None}
			opt.step()
			opt.zero_grad(set_to_none=True)
		stats = block.stats()
		results.append(dict(params={n: p.detach().clone() for n, p in block.named_parameters()},
							history=block.history.snapshot(), aux=block.last_aux_loss.clone(), missing=sorted(missing),
							stats=stats, reduced=distributed.all_reduce_stats(stats),
							# Unequal rows: rank 0 all its rows, rank 1 its last batch only.
							uneven=distributed.all_reduce_stats(block.history.stats(last=ROWS * (STEPS if rank == 0 else 1)))))
	torch.save(results, f"{out_dir}/rank{rank}.pt")
	dist.destroy_process_group()


def _free_port():
	with socket.socket() as s:
		s.bind(("127.0.0.1", 0))
		return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
	"""Returns each rank's results for every case in CASES (runs the 2 gloo workers once)."""
	out = tmp_path_factory.mktemp("ddp")
	context = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
	deadline = time.monotonic() + 180
	try:
		while not context.join(timeout=1):
			if time.monotonic() > deadline:
				pytest.fail("DDP workers did not finish within 180 s")
	finally:
		for p in context.processes:
			if p.is_alive():
				p.kill()
	return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single(dispatch, batched, aux, zloss, starved, *, per_rank):
	"""
	Trains one process on the same batches. per_rank=False: one forward of the concatenated batch;
	True: what DDP computes, one forward and backward per rank's rows (each with its own aux loss)
	and the mean of their gradients. Returns (block, aux loss of each shard's last forward).
	"""
	block = _block(dispatch, batched, aux, zloss, starved)
	opt = torch.optim.SGD(block.parameters(), lr=LR)
	shard_aux = []
	for x, y in _data():
		if per_rank:
			shard_aux = []
			for r in range(WORLD):
				rows = slice(r * ROWS, (r + 1) * ROWS)
				F.mse_loss(block(x[rows]), y[rows]).backward()
				shard_aux.append(block.last_aux_loss.clone())
			for p in block.parameters():
				p.grad /= WORLD
		else:
			F.mse_loss(block(x), y).backward()
		opt.step()
		opt.zero_grad(set_to_none=True)
	return block, shard_aux


def _assert_params(got, block, **tol):
	for name, p in block.named_parameters():
		torch.testing.assert_close(got[name], p.detach(), msg=lambda m: f"{name}: {m}", **tol)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[
	f"{d}-{'batched' if b else 'per_expert'}-aux{a}-z{z}-{'local' if loc else 'plain_ddp'}{'-starved' if st else ''}"
	for d, b, a, z, loc, st in CASES])
def test_ddp_matches_one_process_on_the_concatenated_batch(ranks, case):
	dispatch, batched, aux, zloss, local, starved = CASES[case]
	r0, r1 = ranks[0][case], ranks[1][case]
	if starved:  # expert 3 got no row anywhere, and still a (zero) gradient: DDP needed no flag
		assert r0["reduced"]["usage"][3] == 0 and r0["reduced"]["mean_weight"][3] == 0
	# No flag needed: every parameter gets a gradient on every rank, and DDP keeps the ranks identical.
	assert r0["missing"] == [] and r1["missing"] == []
	for name in r0["params"]:
		assert torch.equal(r0["params"][name], r1["params"][name]), name
	single, _ = _single(dispatch, batched, aux, zloss, starved, per_rank=False)
	if not local:
		# DDP broadcasts buffers from rank 0 before each forward: without keep_routing_local, rank 1's
		# ring holds rank 0's rows (all but its own last batch), which is why the helper exists.
		rows0 = single.history.snapshot().view(STEPS, WORLD, ROWS, -1)[:, 0].reshape(-1, 4)
		torch.testing.assert_close(r1["history"][:(STEPS - 1) * ROWS], rows0[:(STEPS - 1) * ROWS])
		return
	if aux == 0:
		# The z-loss is a mean over rows, linear in the batch: DDP trains exactly the full-batch loss.
		_assert_params(r0["params"], single, atol=1e-6, rtol=1e-5)
	else:
		# The balance term is not linear in the batch: DDP trains the mean of the per-rank aux losses,
		# which one process reproduces with one forward per shard, and which differs from the full batch.
		shards, shard_aux = _single(dispatch, batched, aux, zloss, starved, per_rank=True)
		_assert_params(r0["params"], shards, atol=1e-6, rtol=1e-5)
		assert max((r0["params"][n] - p.detach()).abs().max() for n, p in single.named_parameters()) > 1e-5
		torch.testing.assert_close(r0["aux"], shard_aux[0])
		torch.testing.assert_close(r1["aux"], shard_aux[1])
		torch.testing.assert_close(r0["reduced"]["aux_loss"], (shard_aux[0] + shard_aux[1]) / 2)
		single = shards
	# Rank-local history: each rank's ring holds exactly its own rows, step after step.
	rows = single.history.snapshot().view(STEPS, WORLD, ROWS, -1)
	for r, res in enumerate((r0, r1)):
		torch.testing.assert_close(res["history"], rows[:, r].reshape(-1, 4), atol=1e-6, rtol=1e-5)
	# all_reduce_stats gives the single process's statistics of all rows, on both ranks.
	want = single.history.stats()
	for res in (r0, r1):
		got = res["reduced"]
		assert int(got["rows"]) == int(want["rows"]) == STEPS * WORLD * ROWS
		for key in ("usage", "mean_weight", "entropy", "max_load"):
			torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=lambda m: f"{key}: {m}")
	# ...and differs from each rank's own statistics (the test would not notice a no-op otherwise).
	assert not torch.allclose(r0["stats"]["mean_weight"], r1["stats"]["mean_weight"])
	# Ranks with unequal rows are weighted by their rows: the statistics of the rows they hold together.
	held = torch.cat([rows[:, 0].reshape(-1, 4), rows[-1, 1]])
	slots = (held > 0).float().sum(0)
	want = {"rows": held.shape[0], "usage": slots / slots.sum(), "mean_weight": held.mean(0),
			"entropy": -(held * held.clamp(min=1e-12).log()).sum() / held.shape[0]}
	got = r0["uneven"]
	assert int(got["rows"]) == want.pop("rows") == (STEPS + 1) * ROWS
	for key, value in want.items():
		torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=lambda m: f"uneven {key}: {m}")


def test_all_reduce_stats_needs_rows():
	block = MoEBlock(8, [16], 4, n_experts=4, top_k=2, history_rows=None)
	block(torch.randn(5, 8))
	assert int(block.stats()["rows"]) == 5  # a block without history counts its latest batch's rows
	with pytest.raises(ValueError, match="rows"):
		distributed.all_reduce_stats({k: v for k, v in block.stats().items() if k != "rows"})
	with pytest.raises(ValueError, match="stats"):
		distributed.all_reduce_stats({"usage": torch.zeros(4)})


def test_keep_routing_local_names_every_routing_buffer():
	model = torch.nn.Sequential(MoEBlock(8, [16], 4, n_experts=4), torch.nn.Linear(4, 4),
								MoEBlock(4, [8], 2, n_experts=2, history_rows=None))
	names = distributed.keep_routing_local(model)
	latest = ["_last_aux", "_last_slots", "_last_weight", "_last_entropy", "_last_rows"]
	assert names == [f"0.router.{n}" for n in ["history.ring", "history.cursor", *latest]] \
		+ [f"2.router.{n}" for n in latest]
	assert model._ddp_params_and_buffers_to_ignore == names
