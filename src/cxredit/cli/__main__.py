"""`python -m cxredit.cli ...` (and `torchrun ... -m cxredit.cli ...`) runs the CLI."""

import sys

from cxredit.cli import main

sys.exit(main())
