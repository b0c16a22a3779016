"""The top floor: the `hotswap` command (main.py) and its subcommands. Imports anything below it,
lazily, so `hotswap --help` stays instant."""
