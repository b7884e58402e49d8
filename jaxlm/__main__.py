"""`python -m jaxlm` is the same as the `jaxlm` console script."""

import sys

from jaxlm.cli import main

# Guarded: grain's worker processes (data.num_workers) start by re-importing the main module.
if __name__ == "__main__":
    sys.exit(main())
