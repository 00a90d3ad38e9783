"""`python -m fedtune` is the `fedtune` command."""

from fedtune.cli import main

main()
