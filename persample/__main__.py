"""``python -m persample``: the DP-SGD demo (see :mod:`persample.bench.demo`)."""

from .bench.demo import main

main()
