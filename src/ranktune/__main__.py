"""`python -m ranktune` runs the command line."""

import sys

from ranktune.cli.main import main

sys.exit(main())
