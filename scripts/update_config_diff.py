"""
Regenerates patches/config.yaml.diff from patches/moe.yaml: the fragment's keys added to upstream's
config.yaml (after `save_csv`) at the pinned commit. Run after editing moe.yaml:
    python scripts/update_config_diff.py /path/to/tdmpc2
tests/test_patches.py checks that both files hold the plugin's defaults and that the diff applies.
"""
import difflib
import sys
from pathlib import Path

PATCHES = Path(__file__).resolve().parent.parent / "patches"
ANCHOR = "save_csv: true\n\n"


def main(checkout):
	config = Path(checkout).expanduser() / "tdmpc2" / "config.yaml"
	before = config.read_text()
	if ANCHOR not in before:
		sys.exit(f"{config}: no '{ANCHOR.strip()}' line to add the keys after (not the pinned commit?)")
	fragment = (PATCHES / "moe.yaml").read_text()
	after = before.replace(ANCHOR, ANCHOR + fragment[fragment.index("# moe\n"):] + "\n", 1)
	diff = difflib.unified_diff(before.splitlines(True), after.splitlines(True),
								"a/tdmpc2/config.yaml", "b/tdmpc2/config.yaml")
	(PATCHES / "config.yaml.diff").write_text("".join(diff))


if __name__ == "__main__":
	main(sys.argv[1] if len(sys.argv) > 1 else "~/tdmpc2")
