"""``python -m lorayard <command>``: the same as the ``lorayard`` command."""

import sys

from lorayard.cli import main

sys.exit(main())
