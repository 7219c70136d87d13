"""`python -m llmc ...`: the same as the `llmc` command."""
import sys

from .cli import main

sys.exit(main())
