"""``python -m hpcm.evaluate``: see :mod:`hpcm.evaluate.bitstreams`."""

import sys

from hpcm.evaluate.bitstreams import main

sys.exit(main())
