"""`python -m cli ...` is `fedcare ...`."""

import sys

from cli import main

sys.exit(main())
