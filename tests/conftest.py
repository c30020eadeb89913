"""
Shared fixtures. Tests that need upstream TD-MPC2 take `tdmpc2_root` and are skipped, with a
reason saying how to provide a checkout, when $TDMPC2_ROOT is not set.
"""
import os
from pathlib import Path

import pytest
import torch

from tdmpc2_moe.upstream import checkout, patching

# The test tree, the repository around it, and the committed files tests compare with.
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DATA = TESTS / "data"

# Walker-walk as upstream's make_env reports it: 24 state dims, 6 action dims, 500-step episodes.
WALKER = dict(obs_dim=24, action_dim=6, episode_length=500)
# The smallest agent upstream offers, with planning cut down so that CPU tests stay short.
SMALL = ["task=walker-walk", "model_size=1", "compile=false", "batch_size=32", "steps=100000",
		 "num_samples=64", "num_elites=8", "num_pi_trajs=8", "iterations=2", "monitor_mem_interval=0"]


# Fixtures that need a checkout outside the repository: the tests using them are `integration`.
CHECKOUT_FIXTURES = ("tdmpc2_root", "fork_root")


def pytest_collection_modifyitems(config, items):
	"""Marks every test that (directly or through another fixture) uses a checkout fixture as `integration`."""
	for item in items:
		if any(name in getattr(item, "fixturenames", ()) for name in CHECKOUT_FIXTURES):
			item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tdmpc2_root():
	"""Returns the TD-MPC2 package directory named by $TDMPC2_ROOT, put on sys.path; skips when absent."""
	if not os.environ.get(checkout.ENV_VAR):
		pytest.skip(f"set {checkout.ENV_VAR} to a TD-MPC2 checkout at commit {checkout.PINNED_COMMIT}")
	try:
		return checkout.activate()
	except FileNotFoundError as exc:
		pytest.skip(str(exc))


@pytest.fixture
def unpatched():
	"""Makes sure the test starts and ends with TD-MPC2 unpatched."""
	patching.unpatch()
	yield
	patching.unpatch()


@pytest.fixture
def walker_cfg(tdmpc2_root, unpatched):
	"""
	Returns a factory `make(*overrides)` of parsed upstream configs shaped like walker-walk (without
	building the environment), on the CPU, with TD-MPC2 patched for the test's duration.
	Runs torch on one thread: at these batch sizes a second thread gains little, and on a shared
	2-core machine oversubscribed threads made updates 3x slower.
	"""
	threads = torch.get_num_threads()
	torch.set_num_threads(1)
	patching.patch(device="cpu")

	def make(*overrides):
		cfg = checkout.load_cfg([*SMALL, "device=cpu", *overrides])
		cfg.obs_shape = {"state": (WALKER["obs_dim"],)}
		cfg.action_dim = WALKER["action_dim"]
		cfg.episode_length = WALKER["episode_length"]
		cfg.seed_steps = WALKER["episode_length"]
		return cfg
	yield make
	torch.set_num_threads(threads)


def fill_buffer(cfg, episodes=2, seed=0):
	"""Returns an upstream `Buffer(cfg)` holding `episodes` random walker-shaped episodes."""
	from tensordict import TensorDict
	from common.buffer import Buffer
	g = torch.Generator().manual_seed(seed)
	buffer = Buffer(cfg)
	n = cfg.episode_length + 1
	for _ in range(episodes):
		buffer.add(TensorDict(
			obs=torch.randn(n, cfg.obs_shape["state"][0], generator=g),
			action=torch.rand(n, cfg.action_dim, generator=g) * 2 - 1,
			reward=torch.rand(n, generator=g),
			terminated=torch.zeros(n),
			batch_size=(n,)))
	return buffer


def assert_compiled_matches_eager(block, backend, steps=2, after_step=None):
	"""
	Compiles a deep copy of `block` with `torch.compile(fullgraph=True, backend=backend)` and checks,
	for `steps` training forwards + backwards on random [2, 16, in] inputs, that its outputs and every
	parameter's gradient equal the eager block's; `after_step(step, eager, twin)` adds checks per
	step. Finally a no_grad call of the compiled copy must build no graph. Returns the compiled copy.
	"""
	import copy
	twin = copy.deepcopy(block)
	compiled = torch.compile(twin, fullgraph=True, backend=backend)
	for step in range(steps):
		x = torch.randn(2, 16, block.in_dim)
		eager = block(x)
		eager.square().sum().backward()
		out = compiled(x)
		out.square().sum().backward()
		torch.testing.assert_close(out, eager)
		for (name, p), q in zip(block.named_parameters(), twin.parameters()):
			torch.testing.assert_close(q.grad, p.grad, msg=lambda m: f"step {step} {name}: {m}")
		if after_step is not None:
			after_step(step, block, twin)
	with torch.no_grad():
		assert compiled(x).grad_fn is None
	return compiled


@pytest.fixture
def make_buffer():
	"""Returns `fill_buffer(cfg, episodes=2, seed=0)`, building upstream Buffers of random walker-shaped episodes."""
	return fill_buffer


def _cuda_skip_reason():
	"""Returns why the cuda variant of a device-parametrised test cannot run here, or None when it can."""
	if not torch.cuda.is_available():
		return "no CUDA device (torch.cuda.is_available() is False); scripts/gpu_check.sh runs these on a GPU"
	from tdmpc2_moe.ops import operators as ops
	if ops.backend() != "cuda":
		return f"tdmpc2_moe._C has no CUDA kernels (backend() == {ops.backend()!r}): build with nvcc and a CUDA torch"
	return None


CUDA_SKIP_REASON = _cuda_skip_reason()
# Devices of the op / GateHistory / MoEBlock suites: "cpu" always, "cuda" when a GPU and the CUDA
# kernels are there, so the same suite is the GPU's acceptance test. Use with
# @pytest.mark.parametrize("device", DEVICES).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(CUDA_SKIP_REASON is not None,
																   reason=CUDA_SKIP_REASON or ""))]


@pytest.fixture(params=DEVICES)
def on_device(request):
	"""Runs the test once per device of DEVICES with that device as torch's default (factory calls such as
	torch.randn and GateHistory(...) without a device create there); returns the device name."""
	with torch.device(request.param):
		yield request.param
