"""``python -m densenet``: the command line (also what ``torchrun -m densenet`` runs)."""

import sys

from densenet.cli import main

sys.exit(main())
