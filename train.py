"""`python train.py --config configs/chorales.toml [section.key=value ...] [--resume | --overwrite]`.

A thin wrapper: the training loop lives in midistral/train.py (installed, it is `midistral train`).
"""

import sys

from midistral.train import main

if __name__ == "__main__":
    sys.exit(main())
