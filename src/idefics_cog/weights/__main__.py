"""`python -m idefics_cog.weights`: an alias of `script/download-weights` (download.main)."""

import sys

from idefics_cog.weights.download import main

if __name__ == "__main__":
    sys.exit(main())
