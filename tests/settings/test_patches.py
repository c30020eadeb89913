"""patches/: the config fragment and the diff against upstream's config.yaml match the plugin."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tdmpc2_moe.settings.config_keys import config_defaults, config_yaml
from tdmpc2_moe.settings import MoESettings
from conftest import REPO

PATCHES = REPO / "patches"


def _added_lines(diff):
	return "\n".join(line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))


def test_fragment_is_generated_from_the_settings_record():
	# Keys, defaults and docs come from tdmpc2_moe/settings/record.py: `python scripts/update_patches.py ~/tdmpc2`.
	assert (PATCHES / "moe.yaml").read_text() == config_yaml()
	assert yaml.safe_load(config_yaml()) == config_defaults()


def test_diff_defaults_equal_the_plugins():
	assert yaml.safe_load(_added_lines((PATCHES / "config.yaml.diff").read_text())) == config_defaults()


def test_config_defaults_are_valid_settings():
	assert MoESettings.resolve(config_defaults()) == MoESettings.resolve()


def test_diff_applies_to_the_pinned_checkout(tdmpc2_root, tmp_path):
	checkout = tmp_path / "tdmpc2"
	(checkout / "tdmpc2").mkdir(parents=True)
	shutil.copy(Path(tdmpc2_root) / "config.yaml", checkout / "tdmpc2" / "config.yaml")
	diff = (PATCHES / "config.yaml.diff").read_text()
	if shutil.which("patch"):
		dry = subprocess.run(["patch", "-p1", "--dry-run"], input=diff, cwd=Path(tdmpc2_root).parent,
							 capture_output=True, text=True)
		assert dry.returncode == 0, dry.stdout + dry.stderr
		cmd = ["patch", "-p1"]
	elif shutil.which("git"):
		cmd = ["git", "apply", "-"]
	else:
		pytest.skip("neither patch nor git is installed")
	applied = subprocess.run(cmd, input=diff, cwd=checkout, capture_output=True, text=True)
	assert applied.returncode == 0, applied.stdout + applied.stderr
	from omegaconf import OmegaConf
	cfg = OmegaConf.load(checkout / "tdmpc2" / "config.yaml")
	container = OmegaConf.to_container(cfg)
	assert {k: container[k] for k in config_defaults()} == config_defaults()
	assert cfg.lr == 3e-4 and cfg.compile is True, "the rest of upstream's config must stay as it was"
