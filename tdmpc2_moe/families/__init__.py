"""
Task families (docs/design.md 21): which environments a task name builds, beside the ones upstream's
`make_env` knows. Each family is a name rule plus one factory, registered in one place (`registry`):
HumanoidBench (`humanoid_<gym id>`, `humanoid_bench`), any registered Gymnasium environment
(`gym:<id>`, `gymnasium_tasks`), and upstream's own families (DMC, Gymnasium MuJoCo, MyoSuite,
Meta-World, ManiSkill; `upstream_families`) with what each needs installed. `make` is the patched
`make_env` that tries them, `task_sets` the multitask agents over any of them (`tasks=[...]`). Which
family runs on this machine is found by making one environment of each (upstream/family_probe.py, run
by `tdmpc2-moe doctor`).

Imports `settings` only (and, at run time, the TD-MPC2 checkout's own `envs` modules and the families'
packages).
"""
