"""`python -m eval.bench [--quick | --soak N] [--out DIR] ...`"""

import sys

from .run import main


if __name__ == "__main__":
    sys.exit(main())
