"""``python -m fastfair`` (and ``torchrun ... -m fastfair audit ...``) runs the ``fastfair`` command."""
import sys

from .cli import main

sys.exit(main())
