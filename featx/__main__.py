"""`python -m featx`: the featx command."""

import sys

from featx.cli.app import main

sys.exit(main())
