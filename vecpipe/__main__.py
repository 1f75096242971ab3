"""``python -m vecpipe``: the same as the ``vecpipe`` command."""

import sys

from vecpipe.cli import main

sys.exit(main())
