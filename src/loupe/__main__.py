"""`python -m loupe ...` (and `torchrun -m loupe train ...`): the `loupe` command."""

import sys

from loupe.cli import main

sys.exit(main())
