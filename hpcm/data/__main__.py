"""``python -m hpcm.data``: the ``hpcm data`` command (:mod:`hpcm.data.commands`)."""

import sys

from hpcm.data.commands import main

sys.exit(main())
