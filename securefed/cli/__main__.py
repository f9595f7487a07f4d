"""``python -m securefed.cli``: the same as the ``securefed`` command."""

from securefed.cli import main

main()
