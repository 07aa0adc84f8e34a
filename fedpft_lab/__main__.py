"""``python -m fedpft_lab ...`` is the same as the ``fedpft-lab`` command."""
import sys

from .cli import main

sys.exit(main())
