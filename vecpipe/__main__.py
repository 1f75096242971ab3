"""``python -m vecpipe``: the same as the ``vecpipe`` command."""

import sys

from vecpipe.cli.main import main

sys.exit(main())
