"""`python -m svdrank`: the same as the `svdrank` command."""

from svdrank.cli import main

main()
