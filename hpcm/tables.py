"""Command alias kept stable: ``python -m hpcm.tables`` runs :mod:`hpcm.analysis.tables`, where the code lives."""

import sys

from hpcm.analysis.tables import main

if __name__ == "__main__":
    sys.exit(main())
