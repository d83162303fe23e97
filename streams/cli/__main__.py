"""``python -m streams.cli``: the same as the ``layerwatch`` console script."""

import sys

from streams.cli import main

sys.exit(main())
