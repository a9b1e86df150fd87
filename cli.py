#!/usr/bin/env python
"""``python cli.py ...`` from a checkout: the same commands as the installed ``stableseg``."""

from labeler.commands import main

if __name__ == "__main__":
    main()
