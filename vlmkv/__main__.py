"""`python -m vlmkv ...` runs the command line (the same as the `vlmkv` script)."""
import sys

from .cli import main

sys.exit(main())
