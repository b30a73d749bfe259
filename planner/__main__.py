"""`python -m memplan`: the same command line as the `memplan` script."""

from memplan.cli import main

main()
