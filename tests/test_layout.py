"""
The package's layout is docs/architecture.md's layers, from the code's own imports: one folder per
layer under a short face, each module importing only its own folder and the layers below, library code
never importing cli/, no import circle anywhere; the tests mirror the folders; and every module path
from before the folders still imports as the same module.
"""
import ast
import importlib
from pathlib import Path

import pytest

import tdmpc2_moe
from conftest import REPO, TESTS
from tdmpc2_moe._moved import MOVED

PACKAGE = REPO / "tdmpc2_moe"
# Bottom to top (docs/architecture.md); a module may import its own layer and the ones before it.
LAYERS = ("settings", "ops", "block", "analysis", "families", "upstream", "runs", "cli")
FACE = {"__init__.py", "__main__.py", "_moved.py"}


def _module_name(path):
	parts = path.relative_to(REPO).with_suffix("").parts
	return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
	"""Returns {dotted name: path} of every module of the source tree's package."""
	return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "_csrc" not in p.parts}


def _imports(name, path, modules):
	"""Returns the package modules `name` imports anywhere in its file (function bodies included)."""
	package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
	found = set()
	for node in ast.walk(ast.parse(path.read_text())):
		if isinstance(node, ast.Import):
			found |= {a.name for a in node.names if a.name.startswith("tdmpc2_moe")}
		elif isinstance(node, ast.ImportFrom):
			if node.level:
				base = package.split(".")[:len(package.split(".")) - node.level + 1]
				source = ".".join(base + ([node.module] if node.module else []))
			elif (node.module or "").startswith("tdmpc2_moe"):
				source = node.module
			else:
				continue
			for alias in node.names:
				child = f"{source}.{alias.name}"
				# `from . import x` imports module x; `from .m import f` imports m. `_C` is the compiled
				# operator, below every layer.
				found.add(child if child in modules or alias.name == "_C" else source)
	return {m for m in found if m in modules and m != name}


def _layer(name):
	parts = name.split(".")
	return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_top_is_the_face_and_one_folder_per_layer():
	entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__" and not p.name.startswith(("_C.", "_C", "_csrc"))}
	assert entries == FACE | set(LAYERS)
	for layer in LAYERS:
		init = PACKAGE / layer / "__init__.py"
		doc = ast.get_docstring(ast.parse(init.read_text()))
		assert doc and ("Imports" in doc or layer == "cli"), f"{init} must say what it holds and what it may import"
		assert [p for p in (PACKAGE / layer).iterdir() if p.is_dir() and p.name != "__pycache__"] == []


def test_imports_go_down_the_layers_and_never_in_a_circle():
	modules = _modules()
	graph = {name: _imports(name, path, modules) for name, path in modules.items()}
	upward = []
	for name, targets in graph.items():
		here = _layer(name)
		if here is None:
			continue  # the face imports from every layer
		for target in targets:
			there = _layer(target)
			if there is None or LAYERS.index(there) > LAYERS.index(here):
				upward.append(f"{name} -> {target}")
	assert upward == []

	def reaches(start, goal, seen=()):
		return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph[start])
	assert [m for m in graph if reaches(m, m)] == []
	# The check sees real edges (a graph that found no imports would pass trivially).
	assert "tdmpc2_moe.block.moe" in graph["tdmpc2_moe.upstream.patching"]
	assert "tdmpc2_moe.settings.checks" in graph["tdmpc2_moe.ops.operators"]


def test_an_upward_import_is_caught(tmp_path):
	# Negative control: a block module that imports the patch is an upward edge.
	modules = dict(_modules())
	fake = tmp_path / "tdmpc2_moe" / "block" / "bad.py"
	fake.parent.mkdir(parents=True)
	fake.write_text("from ..upstream import patching\n")
	name = "tdmpc2_moe.block.bad"
	targets = _imports(name, fake, {**modules, name: fake})
	assert targets == {"tdmpc2_moe.upstream.patching"}
	assert LAYERS.index(_layer("tdmpc2_moe.upstream.patching")) > LAYERS.index(_layer(name))


def test_tests_mirror_the_folders():
	folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name not in ("data", "__pycache__") and not p.name.startswith(".")}
	assert folders == set(LAYERS)
	for layer in LAYERS:
		assert list((TESTS / layer).glob("test_*.py")), f"tests/{layer}/ has no tests"
	names = [p.name for p in TESTS.rglob("test_*.py")]
	assert len(names) == len(set(names)), "test file names must stay unique (pytest imports them by basename)"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_every_module_path_from_before_the_folders_imports_as_the_same_module(old):
	module = importlib.import_module(f"tdmpc2_moe.{old}")
	assert module is importlib.import_module(f"tdmpc2_moe.{MOVED[old]}")
	assert module.__spec__.name == f"tdmpc2_moe.{MOVED[old]}"


def test_the_public_paths_of_the_docs():
	from tdmpc2_moe.distributed import all_reduce_stats, keep_routing_local
	from tdmpc2_moe.ops import orthonormalize, topk_gate
	from tdmpc2_moe.settings import MoESettings
	from tdmpc2_moe.block import distributed
	assert (all_reduce_stats, keep_routing_local) == (distributed.all_reduce_stats, distributed.keep_routing_local)
	assert topk_gate is tdmpc2_moe.topk_gate and callable(orthonormalize)
	assert MoESettings is importlib.import_module("tdmpc2_moe.settings.record").MoESettings
	for name in tdmpc2_moe.__all__:
		assert getattr(tdmpc2_moe, name) is not None
	# No old path shadows a name of the face (importing a submodule sets the package's attribute).
	assert not set(MOVED) & set(tdmpc2_moe.__all__)
	assert Path(tdmpc2_moe.__file__).parent.name == "tdmpc2_moe"
