"""``python -m lorakit.cli`` (what ``torchrun -m lorakit.cli`` runs): the same as ``lorakit``."""

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main())
