"""
Regenerates patches/moe.yaml from the settings record (tdmpc2_moe/settings/record.py: each key, its config
default and its doc) and patches/config.yaml.diff from it: the keys added to upstream's config.yaml
(after `save_csv`) at the pinned commit. Run after changing a setting:
    python scripts/update_patches.py /path/to/tdmpc2
tests/settings/test_patches.py checks that both files are what this writes and that the diff applies.
"""
import difflib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tdmpc2_moe.settings.config_keys import config_yaml  # noqa: E402 (after the path: the source tree's settings)

PATCHES = Path(__file__).resolve().parent.parent / "patches"
ANCHOR = "save_csv: true\n\n"


def main(checkout):
	fragment = config_yaml()
	(PATCHES / "moe.yaml").write_text(fragment)
	config = Path(checkout).expanduser() / "tdmpc2" / "config.yaml"
	before = config.read_text()
	if ANCHOR not in before:
		sys.exit(f"{config}: no '{ANCHOR.strip()}' line to add the keys after (not the pinned commit?)")
	after = before.replace(ANCHOR, ANCHOR + fragment[fragment.index("# moe\n"):] + "\n", 1)
	diff = difflib.unified_diff(before.splitlines(True), after.splitlines(True),
								"a/tdmpc2/config.yaml", "b/tdmpc2/config.yaml")
	(PATCHES / "config.yaml.diff").write_text("".join(diff))


if __name__ == "__main__":
	main(sys.argv[1] if len(sys.argv) > 1 else "~/tdmpc2")
