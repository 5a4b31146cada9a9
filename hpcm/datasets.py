"""Command alias kept stable: ``python -m hpcm.datasets`` runs :mod:`hpcm.data.datasets`, where the code lives."""

import sys

from hpcm.data.datasets import main

if __name__ == "__main__":
    sys.exit(main())
