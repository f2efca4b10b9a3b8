"""`python -m runtime.data`: the data command's entry point; its body is runtime/data_cli.py.

The one import from runtime/data up to a higher layer, on purpose: the command reads the job's
TOML through the trainer's config loader, so it lives in the top layer (beside runtime/plan.py);
this shim keeps the command's name. No module of the data package imports it.
"""

import sys

from runtime.data_cli import main

if __name__ == "__main__":
    sys.exit(main())
