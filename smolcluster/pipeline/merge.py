"""``python -m smolcluster.pipeline.merge RUN_DIR``: merge stage shards into one checkpoint.safetensors."""

from __future__ import annotations

import sys

from smolcluster.pipeline.shards import main

if __name__ == "__main__":
    sys.exit(main())
