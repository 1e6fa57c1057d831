"""``python -m tensafe.trainer``: run the trainer service until SIGTERM."""

import sys

from tensafe.trainer.server import main

sys.exit(main())
