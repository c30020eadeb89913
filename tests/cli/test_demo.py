"""`tdmpc2-moe demo`: runs end to end on a few steps, prints the table and writes the memory plot."""
import pytest
import torch

from tdmpc2_moe import cli
from tdmpc2_moe.cli.demo import count_host_calls


def test_demo_prints_the_table_and_writes_the_png(tmp_path, capsys):
	out = tmp_path / "demo"
	assert cli.main(["demo", "--steps", "40", "--warmup", "5", "--sample-every", "10", "--batch", "32",
					 "--out", str(out)]) == 0
	text = capsys.readouterr().out
	rows = {line.split()[0] if not line.startswith("leaky + fix") else "leaky + fix": line
			for line in text.splitlines() if line.startswith(("MoEBlock ", "leaky "))}
	assert set(rows) == {"MoEBlock", "leaky + fix", "leaky"}
	# history bytes and host copies per step: the ring's fixed size vs one .cpu() gate per forward.
	assert rows["MoEBlock"].split()[-3:-1] == ["1,048,584", "0.0"]
	assert rows["leaky"].split()[-3:-1] == [f"{40 * 2 * 32 * 4 * 4 + 5 * 2 * 32 * 4 * 4:,}", "2.0"]
	png = out / "memory.png"
	assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_count_host_calls_counts_and_restores():
	t = torch.ones(1)
	original = torch.Tensor.item
	with count_host_calls() as calls:
		t.item()
		t.cpu()
		t.tolist()
	assert calls[0] == 3
	assert torch.Tensor.item is original and "cpu" not in torch.Tensor.__dict__


def test_bad_demo_arguments_raise():
	with pytest.raises(ValueError, match="--steps"):
		cli.main(["demo", "--steps", "0"])
