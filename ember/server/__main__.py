"""``python -m ember.server MODEL ...`` is ``ember serve MODEL ...``."""

import sys

from ember.commands.serve import main

sys.exit(main())
