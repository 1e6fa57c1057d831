"""``python -m tensafe.he_runtime``: run the he_runtime service until SIGTERM."""

import sys

from tensafe.he_runtime.server import main

sys.exit(main())
