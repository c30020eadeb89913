"""`python -m tdmpc2_moe` is the `tdmpc2-moe` command."""
import sys

from .cli import main

sys.exit(main())
