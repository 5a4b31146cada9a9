"""``python -m hpcm.data``: export the embedded sample photos (see :func:`hpcm.data.images.main`)."""

import sys

from hpcm.data.images import main

sys.exit(main())
