"""``python -m TransferSegLib ...`` is the same as the ``transferseg`` command."""

import sys

from TransferSegLib.cli import main

sys.exit(main())
