"""``python -m hpcm COMMAND ...``: the ``hpcm`` console script, not installed (:mod:`hpcm.cli`)."""

import sys

from hpcm.cli import main

sys.exit(main())
