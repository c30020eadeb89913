"""
Training runs: upstream's training with the patch (`training`), its loop with crash-safe checkpoints
and resume (`resume`, the files in `checkpoint`), Hydra sweeps (`sweep`) and the import of the fork's
checkpoints (`fork_import`).

Imports every layer below; never `cli`.
"""
