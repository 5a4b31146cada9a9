"""Command alias kept stable: ``python -m hpcm.rd`` runs :mod:`hpcm.analysis.rd`, where the code lives."""

import sys

from hpcm.analysis.rd import main

if __name__ == "__main__":
    sys.exit(main())
