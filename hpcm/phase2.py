"""Command alias kept stable: ``python -m hpcm.phase2`` runs :mod:`hpcm.analysis.phase2`, where the code lives."""

import sys

from hpcm.analysis.phase2 import main

if __name__ == "__main__":
    sys.exit(main())
