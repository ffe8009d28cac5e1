"""`python -m normbench ...` is the `normbench` command: also the torchrun entry
(`torchrun --nproc_per_node=8 -m normbench train ...`), so every rank runs the command's checks."""

import sys

from normbench.cli import main

sys.exit(main())
