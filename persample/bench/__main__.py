"""``python -m persample.bench``: see :mod:`persample.bench.cli`."""

from .cli import main

main()
