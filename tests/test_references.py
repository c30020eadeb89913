"""
Every document and file the repository's code and docs cite exists: a reader who clones the repository
can follow each `docs/<name>.md` (and other repository-relative `.md`) reference and each
repository-relative source path (`tdmpc2_moe/block/moe.py`, `tests/ops/test_ops.py`), each
"docs/design.md N" section number names a heading of docs/design.md, and no dotted module path names a
module from before the package's folders (those still import, but are not where things live).
"""
import functools
import re

from conftest import REPO
from tdmpc2_moe._moved import MOVED

# Where references live: the package, its tests and benchmarks, scripts, docs and the top-level README.
SOURCES = ["tdmpc2_moe", "tests", "benchmarks", "scripts", "docs", "csrc", "README.md", "patches"]
SUFFIXES = {".py", ".md", ".sh", ".yaml", ".cpp", ".h", ".cu"}
# A repository-relative path to a markdown file, e.g. docs/gpu.md or benchmarks/learning/README.md.
MD_PATH = re.compile(r"(?<![\w./-])((?:docs|benchmarks|tests|scripts|patches)/[\w./-]*?\.md)\b")
# A repository-relative path of a source file or folder (globs and placeholders such as <name> are not paths).
SOURCE_PATH = re.compile(r"(?<![\w./<-])((?:tdmpc2_moe|tests|benchmarks|scripts|csrc)/[\w./-]*\w(?:\.(?:py|sh|cpp|h|cu)\b|/))")
DOTTED_MODULE = re.compile(r"(?<![\w.])tdmpc2_moe\.([a-z_]+)\b")
# Cited paths that are not in a clone, on purpose: the sources inside an installed package (setup.py
# copies csrc/ there) and the git-ignored folder the learning runs are made in.
NOT_IN_A_CLONE = ("tdmpc2_moe/_csrc/", "benchmarks/learning/work/")
DESIGN_SECTION = re.compile(r"docs/design\.md (?:sec\. )?(\d+[a-z]?)")


@functools.cache
def _source_texts():
	"""Returns (path relative to the repository, text) of every source file, read once for all tests."""
	paths = []
	for name in SOURCES:
		path = REPO / name
		if path.is_file():
			paths.append(path)
		elif path.is_dir():
			paths.extend(p for p in sorted(path.rglob("*")) if p.suffix in SUFFIXES and p.is_file())
	return tuple((str(p.relative_to(REPO)), p.read_text(errors="replace")) for p in paths)


def test_no_reference_to_the_brief_outside_the_repository():
	"""The brief (the upper-case design file) is not in the repository; code cites docs/design.md instead."""
	brief = "DESIGN" + ".md"  # spelled in two parts so this file does not cite it
	offenders = [name for name, text in _source_texts() if brief in text]
	assert offenders == []


def test_every_cited_markdown_file_exists():
	missing = []
	for name, text in _source_texts():
		for ref in MD_PATH.findall(text):
			if not (REPO / ref).is_file():
				missing.append(f"{name} -> {ref}")
	assert missing == []


def test_design_section_numbers_exist():
	headings = set(re.findall(r"^#{2,3} (\d+[a-z]?)\.", (REPO / "docs/design.md").read_text(), re.M))
	assert {"1", "3a", "5a", "5b", "12", "17"} <= headings
	unknown = []
	for name, text in _source_texts():
		for section in DESIGN_SECTION.findall(text):
			if section not in headings:
				unknown.append(f"{name} -> docs/design.md {section}")
	assert unknown == []


def test_every_cited_source_path_exists():
	missing = []
	for name, text in _source_texts():
		for ref in SOURCE_PATH.findall(text):
			if not (REPO / ref).exists() and not ref.startswith(NOT_IN_A_CLONE):
				missing.append(f"{name} -> {ref}")
	assert missing == []


def test_no_dotted_path_names_a_module_from_before_the_folders():
	old = []
	for name, text in _source_texts():
		if name in ("tdmpc2_moe/_moved.py", "tests/test_layout.py"):
			continue  # the table of the old paths, and its test
		old += [f"{name} -> tdmpc2_moe.{m}" for m in DOTTED_MODULE.findall(text) if m in MOVED]
	assert old == []
