"""
`pip install .` as a user types it (pip's isolated build, no torch there): the wheel carries the C++
sources and nothing a build/ of an older checkout left behind, the first import compiles and caches the extension, and without a compiler the package
falls back to the reference with a warning. Also: benchmarks refuse to time the reference as fused.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds, compiles, soaks or kills runs: minutes (pyproject.toml)

REPO = Path(__file__).resolve().parent.parent
STALE_MODULE = "flat_module_of_an_older_checkout.py"
PROBE = ("import warnings, torch, tdmpc2_moe\n"
		 "warnings.simplefilter('always')\n"
		 "g = tdmpc2_moe.topk_gate(torch.randn(64, 8), 2)\n"
		 "print('backend', tdmpc2_moe.backend(), tuple(g.indices.shape))\n")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
	"""Returns a directory holding the package installed from a wheel built with build isolation."""
	if not (REPO / "setup.py").is_file():
		pytest.skip("needs the source tree (setup.py) next to tests/")
	out = tmp_path_factory.mktemp("wheel")
	# The source tree as a user's checkout has it after updating one that was built before: build/lib
	# still holds a module the new checkout does not have (as the flat modules before the layout move).
	tree = out / "checkout"
	tree.mkdir()
	for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "csrc", "tdmpc2_moe"):
		source = REPO / name
		if source.is_dir():
			shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
		else:
			shutil.copy2(source, tree / name)
	stale = tree / "build" / "lib" / "tdmpc2_moe" / STALE_MODULE
	stale.parent.mkdir(parents=True)
	stale.write_text("raise ImportError('a module of an older checkout')\n")
	build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out / "dist"), str(tree)],
						   capture_output=True, text=True, timeout=600)
	assert build.returncode == 0, build.stderr[-3000:]
	wheel = next((out / "dist").glob("tdmpc2_moe-*.whl"))
	install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(out / "site"),
							  str(wheel)], capture_output=True, text=True, timeout=300)
	assert install.returncode == 0, install.stderr[-3000:]
	return wheel, out / "site"


def _run(site, cache, code=PROBE, **env):
	env = dict(os.environ, PYTHONPATH=str(site), TDMPC2_MOE_BUILD_DIR=str(cache), **env)
	return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=900)


def test_isolated_wheel_carries_sources_and_no_prebuilt_extension(installed_wheel):
	wheel, _ = installed_wheel
	names = zipfile.ZipFile(wheel).namelist()
	assert "tdmpc2_moe/_csrc/ops.cpp" in names and "tdmpc2_moe/_csrc/gate_row.h" in names
	assert any(n.startswith("tdmpc2_moe/_csrc/cuda/") and n.endswith(".cu") for n in names)
	assert not [n for n in names if n.endswith(".so")], "an isolated build cannot have compiled against torch"
	assert f"tdmpc2_moe/{STALE_MODULE}" not in names, "what an older build left in build/lib is not shipped"
	assert "tdmpc2_moe/ops/operators.py" in names


def test_without_a_compiler_the_reference_runs_with_a_warning(installed_wheel, tmp_path):
	_, site = installed_wheel
	out = _run(site, tmp_path / "cache", CXX="/nonexistent/c++")
	assert out.returncode == 0, out.stderr[-3000:]
	assert "backend reference (64, 2)" in out.stdout
	assert "no C++ compiler" in out.stderr and "reference" in out.stderr
	assert "Traceback" not in out.stderr


def test_first_import_compiles_once_and_later_imports_use_the_cache(installed_wheel, tmp_path):
	_, site = installed_wheel
	first = _run(site, tmp_path / "cache")
	assert first.returncode == 0, first.stderr[-3000:]
	assert "backend cpu (64, 2)" in first.stdout
	assert first.stderr.count("compiling the C++ extension on first import") == 1
	second = _run(site, tmp_path / "cache")
	assert "backend cpu (64, 2)" in second.stdout and "compiling" not in second.stderr


def test_benchmarks_refuse_to_time_the_reference_as_fused(tmp_path):
	shutil.copytree(REPO / "tdmpc2_moe", tmp_path / "tdmpc2_moe", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
	env = dict(os.environ, PYTHONPATH=str(tmp_path))
	out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_gating.py"],
						 cwd=REPO / "benchmarks", capture_output=True, text=True, env=env, timeout=300)
	assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
	text = out.stdout + out.stderr
	assert "backend() is 'reference'" in text and "pip install --no-build-isolation ." in text
	assert "passed" not in text
