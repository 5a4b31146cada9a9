"""``python -m hpcm.train --config RUN.yaml --output-dir DIR``: see :mod:`hpcm.train.loop`."""

import sys

from hpcm.train.loop import main

sys.exit(main())
