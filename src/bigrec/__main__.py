"""``python -m bigrec`` is the ``bigrec`` command."""

import sys

from bigrec.cli import main

sys.exit(main())
