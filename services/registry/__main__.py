"""``python -m tensafe.registry``: run the registry service until SIGTERM."""

import sys

from tensafe.registry.server import main

sys.exit(main())
