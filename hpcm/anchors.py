"""Command alias kept stable: ``python -m hpcm.anchors`` runs :mod:`hpcm.analysis.anchors`, where the code lives."""

import sys

from hpcm.analysis.anchors import main

if __name__ == "__main__":
    sys.exit(main())
