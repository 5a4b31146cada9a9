"""Command alias kept stable: ``python -m hpcm.plots`` runs :mod:`hpcm.analysis.plots`, where the code lives."""

import sys

from hpcm.analysis.plots import main

if __name__ == "__main__":
    sys.exit(main())
