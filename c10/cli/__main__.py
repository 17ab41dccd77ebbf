"""`python -m c10.cli`: the same as the `c10` command."""
import sys

from c10.cli import main

sys.exit(main())
