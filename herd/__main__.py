"""`python -m herd`: the `herd` command."""
from herd.cli import main

main()
