"""
Files, statistics and plots: routing statistics of recorded gates and their npz files (`gate_stats`)
and plots (`gate_plots`), gate snapshots during training (`gate_snapshots`), play's recorders
(`recording`), the comparison of training runs (`compare`) and the memory monitor (`monitor`). What a
user may change for a plot lives here.

Imports `settings`, `ops` and `block`; nothing of TD-MPC2.
"""
