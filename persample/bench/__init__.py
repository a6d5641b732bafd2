"""Benchmark and demo tooling, apart from the library's API (nothing here is imported by
``import persample``).

- ``python -m persample.bench`` (:mod:`.cli`): the suites: one layer (:mod:`.layer`,
  its methods in :mod:`.methods`), whole DP-SGD steps (:mod:`.models`, its methods in
  :mod:`.model_methods`) and CUDA kernels (:mod:`.kernels`, with :mod:`.gpu_check` and
  :mod:`.tune`); :mod:`.timing` is their shared clock.
- ``python -m persample.bench.host``: where a CUDA step's host time goes.
- ``python -m persample`` (:mod:`.demo`): DP-SGD on scikit-learn's digits.
"""
