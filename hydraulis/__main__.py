"""``python -m hydraulis``: the same as the ``hydraulis`` console script."""

import sys

from .cli import main

sys.exit(main())
