"""``python -m fraudstream.rules``: see ``fraudstream.rules.cli``."""

from fraudstream.rules.cli import main

main()
