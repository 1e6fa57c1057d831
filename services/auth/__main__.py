"""``python -m tensafe.auth``: run the auth service until SIGTERM."""

import sys

from tensafe.auth.server import main

sys.exit(main())
