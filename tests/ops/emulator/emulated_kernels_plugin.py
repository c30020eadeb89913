"""
pytest plugin that makes the CPU kernels of the tdmpc2_moe ops the shipped CUDA kernels on the SIMT
emulator, for a whole session: `pytest -p emulated_kernels_plugin test_ops.py ...` with tests/ops/emulator
on PYTHONPATH (tests/ops/test_cuda_emulated.py runs it so, in a subprocess of its own, since the swap is for
the life of the process). The `cpu` variants of the device-parametrised op suites then run the .cu
kernels through the dispatcher as user code reaches them (eager, autograd, torch.compile, opcheck,
GateHistory, the self-check, the routed experts), against the same reference and with the same assertions as a GPU run.
The swap goes through torch.library, as tests/ops/test_self_check.py substitutes a wrong kernel: there is
no hook for it in the package. The session summary says how often each emulated kernel ran.
"""
import collections

import torch

import simt_emulator

OPS = ("topk_gate", "topk_gate_record", "topk_gate_backward", "orthonormalize", "orthonormalize_backward",
	   "routed_experts", "routed_experts_train", "routed_experts_backward")
calls = collections.Counter()
_libraries = []


def _counting(name, emulated):
	"""The CPU kernel of tdmpc2_moe::<name>: the emulated op's own CPU kernel, called directly (a dispatch
	by its arguments would pick another kernel for e.g. the meta tensors of the argument-check tests)."""
	cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

	def kernel(*args):
		calls[name] += 1
		return emulated.default.redispatch(cpu, *args)
	return kernel


def pytest_configure(config):
	reason = simt_emulator.skip_reason()
	if reason:
		raise RuntimeError(f"emulated_kernels_plugin: {reason}")
	import tdmpc2_moe  # noqa: F401  (registers the schemas whose CPU kernels are replaced)
	emulated = simt_emulator.load()
	library = torch.library.Library("tdmpc2_moe", "IMPL")
	for name in OPS:
		library.impl(name, _counting(name, getattr(emulated, name)), "CPU")
	_libraries.append(library)


def pytest_terminal_summary(terminalreporter):
	ran = ", ".join(f"{name} {calls[name]}" for name in OPS)
	terminalreporter.write_line(f"emulated CUDA kernels ran: {ran}")
