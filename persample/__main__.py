"""``python -m persample``: the DP-SGD demo (see :mod:`persample.demo`)."""

from .demo import main

main()
