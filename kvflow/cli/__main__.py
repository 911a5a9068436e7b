"""`python -m kvflow.cli ...` is `kvflow ...` (how servers and tests start it as a subprocess)."""

import sys

from kvflow.cli import main

sys.exit(main())
