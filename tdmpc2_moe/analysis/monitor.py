"""MemoryMonitor: cheap periodic memory sampling with a least-squares leak detector."""
import collections
import gc
import logging
import os
import warnings

import psutil
import torch

from ..settings.checks import check_int, check_number

_MB = 1024 ** 2
_GB = 1024 ** 3


def _slope(xs, ys):
	"""Returns the least-squares slope of ys over xs."""
	n = len(xs)
	mx, my = sum(xs) / n, sum(ys) / n
	sxx = sum((x - mx) ** 2 for x in xs)
	return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


class MemoryMonitor:
	"""
	Samples memory every `interval` calls of `step()` (in between, `step()` only increments a
	counter), keeps the last `window` samples, and once `min_samples` samples past the first
	`warmup` exist fits each reading's growth slope (MB per 1000 steps, least squares). A slope
	above `threshold_mb_per_1k` sets `leak_suspected` and warns once (`warnings.warn` and a log line).
	Readings: process RSS (psutil) and, when `device` is CUDA, `torch.cuda.memory_allocated`;
	`source` replaces them with any callable returning {name: MB}. Sampling never syncs the device.
	"""

	def __init__(self, interval=1000, device=None, window=32, threshold_mb_per_1k=5.0, *, min_samples=8,
				 warmup=1, log=None, source=None):
		check_int("interval", interval, 1)
		check_int("window", window, 2)
		check_int("min_samples", min_samples, 2)
		check_int("warmup", warmup, 0)
		if min_samples > window:
			raise ValueError(f"min_samples must be <= window={window}, got {min_samples}")
		check_number("threshold_mb_per_1k", threshold_mb_per_1k, positive=False)
		if source is not None and not callable(source):
			raise ValueError(f"source must be callable, got {type(source).__name__}")
		if device is None:
			device = "cuda" if torch.cuda.is_available() else "cpu"
		self.device = torch.device(device)
		self.interval, self.window, self.min_samples, self.warmup = interval, window, min_samples, warmup
		self.threshold_mb_per_1k = float(threshold_mb_per_1k)
		self.log = log if log is not None else logging.getLogger(__name__)
		self._source = source if source is not None else self._read
		self._process = psutil.Process(os.getpid())
		self._samples = collections.deque(maxlen=window)
		self._steps = 0
		self._seen = 0
		self._slopes = {}
		self._leak = False

	@property
	def steps(self):
		"""Returns the number of `step()` calls so far."""
		return self._steps

	@property
	def samples(self):
		"""Returns the samples in the window, oldest first, as a list of (step, {name: MB})."""
		return list(self._samples)

	@property
	def slopes(self):
		"""Returns the latest fitted growth per reading, {name: MB per 1000 steps} (empty until enough samples)."""
		return dict(self._slopes)

	@property
	def leak_suspected(self):
		"""Returns True when the latest fit shows growth above `threshold_mb_per_1k`."""
		return self._leak

	def _is_cuda(self):
		return self.device.type == "cuda" and torch.cuda.is_available()

	def _read(self):
		out = {"cpu_rss": self._process.memory_info().rss / _MB}
		if self._is_cuda():
			out["gpu_allocated"] = torch.cuda.memory_allocated(self.device) / _MB
		return out

	def step(self):
		"""Counts one step; every `interval` steps takes a sample and re-fits the growth slopes."""
		self._steps += 1
		if self._steps % self.interval:
			return
		self.sample()

	def sample(self):
		"""Takes a sample now (step() calls this every `interval` steps); returns {name: MB}."""
		reading = {k: float(v) for k, v in self._source().items()}
		self._seen += 1
		if self._seen <= self.warmup:
			return reading
		self._samples.append((self._steps, reading))
		if len(self._samples) >= self.min_samples:
			self._fit()
		return reading

	def _fit(self):
		steps = [s for s, _ in self._samples]
		names = set().union(*(r.keys() for _, r in self._samples))
		self._slopes = {name: 1000 * _slope(steps, [r.get(name, 0.0) for _, r in self._samples]) for name in names}
		growing = {k: v for k, v in self._slopes.items() if v > self.threshold_mb_per_1k}
		if growing and not self._leak:
			detail = ", ".join(f"{k} +{v:.2f} MB" for k, v in sorted(growing.items()))
			msg = f"memory keeps growing per 1000 steps ({detail}; threshold {self.threshold_mb_per_1k} MB) " \
				f"over the last {len(self._samples)} samples up to step {self._steps}: possible leak"
			self.log.warning(msg)
			warnings.warn(msg, RuntimeWarning, stacklevel=3)
		self._leak = bool(growing)

	def report(self):
		"""Prints and returns `Memory Usage: [GPU: used/total GB (pct%) | ]CPU: rss GB (System: pct%)`."""
		parts = []
		if self._is_cuda():
			used = torch.cuda.memory_allocated(self.device) / _GB
			total = torch.cuda.get_device_properties(self.device).total_memory / _GB
			parts.append(f"GPU: {used:.2f}/{total:.2f} GB ({100 * used / total:.1f}%)")
		rss = self._process.memory_info().rss / _GB
		parts.append(f"CPU: {rss:.2f} GB (System: {psutil.virtual_memory().percent:.1f}%)")
		text = "Memory Usage: " + " | ".join(parts)
		print(text)
		return text

	def cleanup(self, aggressive=False):
		"""Runs `gc.collect()` and, on CUDA, `empty_cache()` (+ `ipc_collect()` when aggressive); returns gc's count."""
		collected = gc.collect()
		if self._is_cuda():
			torch.cuda.empty_cache()
			if aggressive:
				torch.cuda.ipc_collect()
		return collected
