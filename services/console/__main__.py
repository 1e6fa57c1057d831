"""``python -m tensafe.console``: run the web console until SIGTERM."""

import sys

from tensafe.console.server import main

sys.exit(main())
