"""``python -m benchmarks.run [--quick]``: the benchmark harness from a checkout.

A thin entry point; the harness is ``dg_stream.bench`` (also ``dg-stream bench``).
"""

from __future__ import annotations

import sys

from dg_stream.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
