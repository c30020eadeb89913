"""MemoryMonitor: sampling cadence, bounded window, slope fit and warning, report format, cleanup."""
import logging
import re
import warnings

import pytest

from tdmpc2_moe.analysis.monitor import MemoryMonitor


class FakeMemory:
	"""Memory source growing by `mb_per_step` per monitored step; counts how often it is read."""

	def __init__(self, mb_per_step, start=1000.0):
		self.mb_per_step, self.start, self.reads, self.monitor = mb_per_step, start, 0, None

	def __call__(self):
		self.reads += 1
		return {"fake": self.start + self.mb_per_step * self.monitor.steps}


def _monitor(mb_per_step, **kwargs):
	fake = FakeMemory(mb_per_step)
	monitor = MemoryMonitor(source=fake, device="cpu", **kwargs)
	fake.monitor = monitor
	return monitor, fake


def test_samples_only_every_interval_steps_and_keeps_a_bounded_window():
	monitor, fake = _monitor(0.0, interval=10, window=5, warmup=0, min_samples=2)
	for _ in range(99):
		monitor.step()
	assert fake.reads == 9
	assert [s for s, _ in monitor.samples] == [50, 60, 70, 80, 90]
	monitor.step()
	assert fake.reads == 10 and len(monitor.samples) == 5


def test_growth_above_threshold_warns_once_and_logs(caplog):
	# 0.02 MB per step = 20 MB per 1000 steps: the fork's reported +0.02 GB / 1000 steps.
	monitor, _ = _monitor(0.02, interval=100, window=16, threshold_mb_per_1k=5.0, min_samples=4)
	with pytest.warns(RuntimeWarning, match="memory keeps growing") as record, \
			caplog.at_level(logging.WARNING, logger="tdmpc2_moe.analysis.monitor"):
		for _ in range(3000):
			monitor.step()
	assert len(record) == 1
	assert monitor.leak_suspected
	assert monitor.slopes["fake"] == pytest.approx(20.0)
	assert any("possible leak" in r.getMessage() for r in caplog.records)


def test_flat_or_slow_growth_is_not_a_leak():
	for rate in (0.0, 0.004):
		monitor, _ = _monitor(rate, interval=100, threshold_mb_per_1k=5.0, min_samples=4)
		with warnings.catch_warnings():
			warnings.simplefilter("error")
			for _ in range(3000):
				monitor.step()
		assert not monitor.leak_suspected
		assert monitor.slopes["fake"] == pytest.approx(1000 * rate)


def test_a_warmup_jump_is_ignored_and_a_fit_needs_min_samples():
	readings = iter([100.0, 900.0] + [900.0] * 20)
	monitor = MemoryMonitor(interval=1, device="cpu", warmup=1, min_samples=5, threshold_mb_per_1k=1.0,
							source=lambda: {"rss": next(readings)})
	for _ in range(4):
		monitor.step()
	assert monitor.slopes == {}
	for _ in range(10):
		monitor.step()
	assert monitor.slopes["rss"] == 0.0 and not monitor.leak_suspected


def test_leak_flag_clears_when_growth_stops():
	values = iter([float(i * 10) for i in range(10)] + [90.0] * 40)
	monitor = MemoryMonitor(interval=1, device="cpu", window=8, min_samples=4, warmup=0,
							threshold_mb_per_1k=1.0, source=lambda: {"rss": next(values)})
	with pytest.warns(RuntimeWarning):
		for _ in range(10):
			monitor.step()
	assert monitor.leak_suspected
	for _ in range(20):
		monitor.step()
	assert not monitor.leak_suspected


def test_real_memory_report_and_cleanup(capsys):
	monitor = MemoryMonitor(interval=1, device="cpu")
	reading = monitor.sample()
	assert reading["cpu_rss"] > 10
	text = monitor.report()
	assert re.fullmatch(r"Memory Usage: CPU: \d+\.\d\d GB \(System: \d+\.\d%\)", text)
	assert capsys.readouterr().out.strip() == text
	assert isinstance(monitor.cleanup(), int)
	assert isinstance(monitor.cleanup(aggressive=True), int)


@pytest.mark.parametrize("kwargs,name", [
	(dict(interval=0), "interval"),
	(dict(window=1), "window"),
	(dict(threshold_mb_per_1k=-1.0), "threshold_mb_per_1k"),
	(dict(min_samples=40, window=10), "min_samples"),
	(dict(source=5), "source"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
	with pytest.raises(ValueError, match=name):
		MemoryMonitor(**kwargs)


def test_report_shows_gpu_usage_on_a_cuda_device(monkeypatch, capsys):
	import torch

	class Props:
		total_memory = 80 * 1024 ** 3

	monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
	monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * 1024 ** 3)
	monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
	text = MemoryMonitor(device="cuda").report()
	assert re.fullmatch(r"Memory Usage: GPU: 2\.00/80\.00 GB \(2\.5%\) \| CPU: \d+\.\d\d GB \(System: \d+\.\d%\)", text)
