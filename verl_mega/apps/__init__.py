"""Applications on top of the library: the `verl-mega` command line (cli.py) and its subcommands
(train, generate, export, demo). Nothing in the library imports from here."""
