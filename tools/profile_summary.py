"""Print where device time goes in a jax.profiler trace, as markdown tables (no viewer).

    python tools/profile_summary.py PROFILE_DIR_OR_TRACE [--top N] [--module SUBSTR]

PROFILE_DIR is what was given to jax.profiler.start_trace (the newest
perfetto_trace.json.gz under it is read) or a trace file itself. --module keeps only ops
of XLA modules whose name contains SUBSTR (e.g. train_step). See
mlembed_jax/perf/profile_summary.py for what is counted.
"""

from __future__ import annotations

import argparse
import sys

from mlembed_jax.perf.profile_summary import find_trace, format_summary, op_times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", metavar="PROFILE_DIR_OR_TRACE")
    ap.add_argument("--top", type=int, default=20, help="ops listed (default 20)")
    ap.add_argument("--module", default=None, help="only hlo_modules containing this")
    a = ap.parse_args(argv)
    try:
        trace = find_trace(a.path)
        times = op_times(trace, module_contains=a.module)
    except (ValueError, OSError, KeyError) as e:  # bad JSON/gzip too: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{trace}\n")
    print(format_summary(times, top=a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
