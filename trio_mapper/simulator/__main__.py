"""``python -m trio_mapper.simulator [flags]``: the ``simulate`` command without the main CLI."""

import sys

from .cli import main

sys.exit(main())
