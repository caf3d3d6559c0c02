"""`python -m dcgan ...`: the same as the `dcgan` console script (torchrun and deepspeed launch it so)."""

import sys

from dcgan.cli import main

sys.exit(main())
