"""
The module paths from before the package was split into one folder per layer (docs/architecture.md):
`tdmpc2_moe.moe`, `tdmpc2_moe.distributed`, `tdmpc2_moe.reference`, ... keep importing. Each old
name is the very module at its new path (the same objects: isinstance checks, monkeypatching and
`tdmpc2_moe.distributed.all_reduce_stats` agree), loaded only when asked for.
"""
import importlib
import importlib.abc
import importlib.util
import sys

# Old module (under tdmpc2_moe) -> where it lives now. `settings`, `ops` and `upstream` are packages of
# the same name now: `tdmpc2_moe.settings.MoESettings` and `tdmpc2_moe.ops.topk_gate` / `orthonormalize`
# are where they were; the rest of the old settings.py, ops.py and upstream.py is in settings.record,
# ops.operators and upstream.checkout. `tdmpc2_moe.backend` is the face's function, as before; its
# module is ops.backend (an alias would replace the function: importing a submodule sets the attribute).
MOVED = {
	"checks": "settings.checks",
	"config_keys": "settings.config_keys",
	"reference": "ops.reference",
	"kernel_check": "ops.kernel_check",
	"_extension": "ops._extension",
	"moe": "block.moe",
	"router": "block.router",
	"experts": "block.experts",
	"expert_layers": "block.expert_layers",
	"dispatch": "block.dispatch",
	"history": "block.history",
	"temperature": "block.temperature",
	"routing_stats": "block.routing_stats",
	"distributed": "block.distributed",
	"baselines": "block.baselines",
	"gate_stats": "analysis.gate_stats",
	"gate_plots": "analysis.gate_plots",
	"gate_snapshots": "analysis.gate_snapshots",
	"recording": "analysis.recording",
	"compare": "analysis.compare",
	"monitor": "analysis.monitor",
	"patching": "upstream.patching",
	"_hooks": "upstream._hooks",
	"device": "upstream.device",
	"heads": "upstream.heads",
	"training": "runs.training",
	"resume": "runs.resume",
	"sweep": "runs.sweep",
	"checkpoint": "runs.checkpoint",
	"fork_import": "runs.fork_import",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
	"""Finds `tdmpc2_moe.<old name>` and loads it as the module at its new path."""

	def find_spec(self, name, path=None, target=None):
		package, _, old = name.partition(".")
		if package != __package__ or old not in MOVED:
			return None
		return importlib.util.spec_from_loader(name, self)

	def create_module(self, spec):
		module = importlib.import_module(f"{__package__}.{MOVED[spec.name.partition('.')[2]]}")
		spec.loader_state = module.__spec__
		return module

	def exec_module(self, module):
		# The import system has just given the module the old name's spec; it keeps its own.
		module.__spec__ = module.__spec__.loader_state


def install():
	"""Puts the finder on `sys.meta_path` once per process."""
	if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
		sys.meta_path.append(MovedModules())
