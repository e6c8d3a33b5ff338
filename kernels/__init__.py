"""Numba kernels of the engine's per-stream arithmetic (resampling, framing, merging, overlap-add).

Compiled once and cached beside the sources (`cache=True`). Numba checks a cached function against
its own file only: a kernel that calls another (intake -> polyphase.resample_row) keeps the callee
it was compiled with until its own file changes. After editing a callee, delete
`kernels/__pycache__/*.nb[ic]` (a fresh install compiles everything anew).
"""
