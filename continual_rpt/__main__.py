"""`python -m continual_rpt` runs the `crpt` command line."""

import sys

from continual_rpt.cli import main

sys.exit(main())
