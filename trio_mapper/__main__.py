import sys

from trio_mapper.tools.cli import main

sys.exit(main())
