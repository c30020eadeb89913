"""
The kernels' self-check (tdmpc2_moe/ops/kernel_check.py, docs/design.md 17) and the backend switch
TDMPC2_MOE_BACKEND: passing on the real kernels, failing with a message that names the op, the case
and the difference when a wrong kernel is substituted (in the test's own process, through
torch.library: no hook in the package), automatic on first use unless TDMPC2_MOE_SELF_CHECK=0, and
doctor's line. Each scenario that depends on process state runs in a fresh subprocess.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tdmpc2_moe
from tdmpc2_moe.ops import kernel_check

needs_c = pytest.mark.skipif(tdmpc2_moe.backend() == "reference", reason="tdmpc2_moe._C is not built")

# Replaces the CPU kernel of topk_gate (via the dispatcher, as a faulty build would) with one that is
# right for E <= 32 and scales the weights by 1.01 for E > 32, like a bug in the block-per-row path.
WRONG_KERNEL = """
import torch
from tdmpc2_moe.ops.reference import topk_gate_reference
lib = torch.library.Library("tdmpc2_moe", "IMPL")
def wrong(logits, k, temperature, renormalize):
	g = topk_gate_reference(logits, k, temperature, renormalize)
	weights = g.weights * 1.01 if logits.shape[1] > 32 else g.weights
	return weights, g.indices, g.expert_prob_mean, g.expert_frac, g.lse
lib.impl("topk_gate", wrong, "CPU")
"""


def _python(code, **env):
	full_env = dict(os.environ, **env)
	for key in ("TDMPC2_MOE_BACKEND", "TDMPC2_MOE_SELF_CHECK"):
		if key not in env:
			full_env.pop(key, None)
	return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
						  env=full_env, timeout=300)


@needs_c
def test_self_check_passes_on_the_cpu_kernels():
	result = tdmpc2_moe.self_check("cpu")
	assert result["device"] == "cpu" and result["backend"] in ("cpu", "cuda")
	assert result["cases"] == len(kernel_check.GATE_CASES) + len(kernel_check.ORTHO_CASES) + len(kernel_check.EXPERT_CASES)
	assert result["seconds"] > 0


@needs_c
def test_a_wrong_routed_experts_kernel_fails_the_check():
	done = _python("""
		import torch, tdmpc2_moe
		from tdmpc2_moe.ops.reference import EXPERT_ACTIVATIONS, routed_experts_reference
		lib = torch.library.Library("tdmpc2_moe", "IMPL")
		def wrong(x, indices, weights, params, activations, simnorm_dim):
			names = [EXPERT_ACTIVATIONS[a] for a in activations]
			return routed_experts_reference(x, indices, weights, params, names, simnorm_dim) * 1.001
		lib.impl("routed_experts", wrong, "CPU")
		try:
			tdmpc2_moe.self_check("cpu")
		except tdmpc2_moe.SelfCheckError as exc:
			print("RAISED", exc)
	""")
	assert done.returncode == 0, done.stderr[-2000:]
	assert "RAISED tdmpc2_moe self-check: routed_experts on cpu disagrees with the reference in case " \
		   "'E=4 k=2 mish,mish,none', output out (inference)" in done.stdout, done.stdout


@needs_c
def test_a_wrong_kernel_fails_the_check_naming_op_case_and_difference():
	done = _python("import tdmpc2_moe\n" + WRONG_KERNEL + textwrap.dedent("""
		try:
			tdmpc2_moe.self_check("cpu")
		except tdmpc2_moe.SelfCheckError as exc:
			print("RAISED", exc)
	"""))
	assert done.returncode == 0, done.stderr[-2000:]
	message = done.stdout
	assert "RAISED" in message and "topk_gate on cpu" in message and "case 'E=40 k=3'" in message, message
	assert "output weights" in message and "largest difference" in message
	assert "TDMPC2_MOE_BACKEND=reference" in message


@needs_c
def test_first_use_runs_the_check_and_the_switch_skips_it():
	code = "import torch, tdmpc2_moe\n" + WRONG_KERNEL + textwrap.dedent("""
		for attempt in range(2):
			try:
				tdmpc2_moe.topk_gate(torch.randn(4, 8), 2)
				print("RAN")
			except tdmpc2_moe.SelfCheckError as exc:
				print("RAISED", str(exc).split(":")[1])
	""")
	checked = _python(code)
	assert checked.returncode == 0, checked.stderr[-2000:]
	# The first call runs the check, which fails; a failed check is not remembered: the next call raises too.
	assert checked.stdout.split("\n")[:2] == ["RAISED  topk_gate on cpu disagrees with the reference in case 'E=40 k=3', output weights"] * 2, checked.stdout
	skipped = _python(code, TDMPC2_MOE_SELF_CHECK="0")
	assert skipped.returncode == 0 and skipped.stdout.split() == ["RAN", "RAN"], skipped.stdout + skipped.stderr


@needs_c
def test_first_use_check_passes_once_per_device_on_the_real_kernels():
	done = _python("""
		import torch, tdmpc2_moe
		from tdmpc2_moe.ops import kernel_check
		assert torch.device("cpu") not in kernel_check._checked
		tdmpc2_moe.topk_gate(torch.randn(4, 8), 2)
		assert torch.device("cpu") in kernel_check._checked
		block = tdmpc2_moe.MoEBlock(8, [16], 4, n_experts=4, top_k=4, orthogonal=True, shared_head=True)
		print(block(torch.randn(3, 8)).shape)
	""")
	assert done.returncode == 0 and "torch.Size([3, 4])" in done.stdout, done.stderr[-2000:]


def test_backend_switch_runs_the_reference_and_says_why():
	done = _python("""
		import warnings, torch
		warnings.simplefilter("error")  # the chosen reference warns about nothing
		import tdmpc2_moe
		from tdmpc2_moe.ops import operators as ops
		print(tdmpc2_moe.backend(), "|", ops.backend_reason())
		block = tdmpc2_moe.MoEBlock(8, [16], 4)
		print(block(torch.randn(3, 8)).shape, tdmpc2_moe.self_check("cpu")["cases"])
	""", TDMPC2_MOE_BACKEND="reference")
	assert done.returncode == 0, done.stderr[-2000:]
	first, second = done.stdout.strip().splitlines()
	assert first.startswith("reference | TDMPC2_MOE_BACKEND=reference chose the plain-PyTorch reference")
	assert second == "torch.Size([3, 4]) 0"


def test_bad_backend_value_names_the_variable():
	done = _python("import tdmpc2_moe", TDMPC2_MOE_BACKEND="fast")
	assert done.returncode != 0
	assert "TDMPC2_MOE_BACKEND must be one of ['auto', 'reference'], got 'fast'" in done.stderr


@needs_c
def test_doctor_prints_the_self_check():
	from tdmpc2_moe.cli import doctor
	findings = doctor.check_self_check()
	assert findings[0].level == "ok" and findings[0].what.startswith("self-check on cpu: the kernels agree")
	if torch.cuda.is_available() and tdmpc2_moe.backend() == "cuda":
		assert any(f.what.startswith("self-check on cuda:0") for f in findings)
