"""``python -m ember.server MODEL ...`` is ``ember serve MODEL ...``."""

import sys

from ember.server.cli import main

sys.exit(main())
