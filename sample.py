"""`python sample.py [prompt.mid] --ckpt RUN_DIR ...`: continue a MIDI prompt, or write a piece from nothing.

A thin wrapper: the command line lives in midistral/sample.py (installed, it is `midistral sample`).
"""

import sys

from midistral.sample import main

if __name__ == "__main__":
    sys.exit(main())
