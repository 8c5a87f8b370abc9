"""`python -m featx`: the featx command."""

import sys

from featx.cli import main

sys.exit(main())
