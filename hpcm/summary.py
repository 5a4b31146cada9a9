"""Command alias kept stable: ``python -m hpcm.summary`` runs :mod:`hpcm.analysis.summary`, where the code lives."""

import sys

from hpcm.analysis.summary import main

if __name__ == "__main__":
    sys.exit(main())
