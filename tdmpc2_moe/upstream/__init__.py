"""
The TD-MPC2 side: finding, activating and configuring a checkout (`checkout`), what `patch()` changes in
it (`patching`, with the reversible-setattr log and import hook of `_hooks`), running its hard-coded
`cuda:0` code on another device (`device`), which of its heads become MoE (`heads`), the
deterministic mode a patched agent can be built in (`determinism`), and whether a task family runs
here, by making one of its environments (`family_probe`).

Imports the layers below (`settings`, `ops`, `block`, `analysis`, `families`); never `runs` or `cli`.
"""
