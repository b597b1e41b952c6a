"""`python -m verl_mega ...` (also under torchrun: `torchrun --nproc-per-node 2 -m verl_mega demo`)."""

import sys

from verl_mega.apps.cli import main

sys.exit(main())
