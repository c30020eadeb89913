"""
Loading an unmodified TD-MPC2 checkout: locate it, import its modules, compose its Hydra config
with this plugin's keys. (Running its CUDA-only constructors on another device is `device.py`.)

TD-MPC2 imports its own modules by top-level name (`common`, `envs`, `trainer`, `tdmpc2`), so its
package directory goes on `sys.path`; these helpers are shared by `tdmpc2-moe train` and `play`.
"""
import os
import sys
import tempfile
from pathlib import Path

from ..settings.config_keys import config_defaults

PINNED_COMMIT = "e9f59321933cbc8e11a002b842adc7d4ffae8ff1"
ENV_VAR = "TDMPC2_ROOT"
# Names that upstream imports at top level; one checkout per process.
UPSTREAM_MODULES = ("common", "envs", "trainer", "tdmpc2", "train")


def locate(path=None):
	"""
	Returns the TD-MPC2 package directory (the one holding tdmpc2.py, common/ and config.yaml) for
	`path`, which may be the checkout root or that directory; `path=None` reads $TDMPC2_ROOT.
	Raises FileNotFoundError saying how to provide a checkout.
	"""
	hint = f"set {ENV_VAR} (or pass --tdmpc2) to a TD-MPC2 checkout at commit {PINNED_COMMIT}"
	if path is None:
		path = os.environ.get(ENV_VAR)
		if not path:
			raise FileNotFoundError(f"no TD-MPC2 checkout given: {hint}")
	root = Path(path).expanduser().resolve()
	for candidate in (root, root / "tdmpc2"):
		if (candidate / "tdmpc2.py").is_file() and (candidate / "common" / "layers.py").is_file() \
				and (candidate / "config.yaml").is_file():
			return candidate
	raise FileNotFoundError(f"{root} is not a TD-MPC2 checkout (no tdmpc2.py, common/layers.py and config.yaml "
							f"in it or in its tdmpc2/ directory): {hint}")


def activate(path=None):
	"""
	Puts the checkout's package directory first on `sys.path` so that `import common.layers`,
	`from tdmpc2 import TDMPC2` and `import train` load it. Returns that directory.
	Raises RuntimeError when upstream modules of another checkout are already imported.
	"""
	pkg = locate(path)
	for name in UPSTREAM_MODULES:
		module = sys.modules.get(name)
		origin = getattr(module, "__file__", None)
		if origin and pkg not in Path(origin).resolve().parents:
			raise RuntimeError(f"module {name!r} is already imported from {origin}, not from the checkout {pkg}; "
							   "use one TD-MPC2 checkout per process")
	if str(pkg) not in sys.path:
		sys.path.insert(0, str(pkg))
	return pkg


def config_yaml(pkg, plugin_keys):
	"""
	Returns upstream's config.yaml as an OmegaConf DictConfig with `plugin_keys` ({key: default})
	added and the `hydra/launcher: submitit_local` default removed: the run is a single in-process
	job and hydra-submitit-launcher is not needed (it is often not installed).
	"""
	from omegaconf import OmegaConf
	base = OmegaConf.load(Path(pkg) / "config.yaml")
	defaults = [d for d in base.get("defaults", []) if "hydra/launcher" not in str(d)]
	if "defaults" in base:
		del base["defaults"]
		if defaults:
			base.defaults = defaults
	clash = sorted(set(plugin_keys) & set(base.keys()))
	if clash:
		raise RuntimeError(f"upstream config.yaml already defines {clash}: the plugin's keys would shadow them")
	return OmegaConf.merge(base, OmegaConf.create(dict(plugin_keys)))


def compose(overrides=(), path=None, plugin_keys=None):
	"""
	Returns the raw Hydra config (a DictConfig, not yet through upstream's `parse_cfg`) of the
	checkout at `path` plus this plugin's keys, with command-line style `overrides`
	(["task=walker-walk", "use_moe=true", ...]). Leaves Hydra's run-time config set, as
	`@hydra.main` does, so that upstream's `parse_cfg` (which calls `get_original_cwd()`) works.
	"""
	from hydra import compose as hydra_compose, initialize_config_dir
	from hydra.core.global_hydra import GlobalHydra
	from hydra.core.hydra_config import HydraConfig
	from omegaconf import OmegaConf, open_dict
	if plugin_keys is None:
		plugin_keys = config_defaults()
	pkg = activate(path)
	merged = config_yaml(pkg, plugin_keys)
	if GlobalHydra.instance().is_initialized():
		GlobalHydra.instance().clear()
	with tempfile.TemporaryDirectory() as tmp:
		OmegaConf.save(merged, Path(tmp) / "config.yaml")
		with initialize_config_dir(config_dir=tmp, version_base=None):
			cfg = hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
	HydraConfig.instance().set_config(cfg)
	with open_dict(cfg):
		del cfg["hydra"]
	return cfg


def load_cfg(overrides=(), path=None):
	"""
	Returns the config upstream's agent expects: `compose(overrides, path)` through upstream's
	`parse_cfg` (a dataclass with model-size, task and work_dir filled in). Environment-dependent
	keys (obs_shape, action_dim, episode_length, seed_steps) are set by upstream's `make_env(cfg)`.
	"""
	cfg = compose(overrides, path)
	from common.parser import parse_cfg
	return parse_cfg(cfg)
