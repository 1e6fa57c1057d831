"""``python -m tensafe.tinker_api``: run the Tinker API until SIGTERM."""

import sys

from tensafe.tinker_api.server import main

sys.exit(main())
