"""`python -m idefics_cog.weights`: an alias of `idefics-cog download` (download.main)."""

import sys

from idefics_cog.weights.download import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m idefics_cog.weights"))
