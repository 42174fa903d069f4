"""``tensorconv bench``'s arguments; the harness is :mod:`tensorconv.bench`."""

from __future__ import annotations

from ..bench import QUICK_SUITES, SUITES
from ._args import open_output, positive_int, write_output


def add_arguments(parser):
    parser.add_argument(
        "suites", nargs="*", choices=[*SUITES, []], default=None, help=f"suites to run (default: all of {SUITES})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes and short timings; with no suite named, only {', '.join(QUICK_SUITES)}: "
        f"under a minute on a 2-core CPU",
    )
    parser.add_argument("--out", metavar="DIR", help="write results.json (and fig6.png) there")
    parser.add_argument(
        "--backend",
        action="append",
        choices=["numpy", "torch", "torch-cuda", "cupy", "jax"],
        help="backend (repeatable; default: every one found)",
    )
    parser.add_argument("--batch", type=positive_int, default=None, help="batch size (default 1, quick 1)")
    parser.add_argument("--repeat", type=positive_int, default=None, help="timed runs per point (default 7, quick 3)")
    parser.add_argument(
        "--allocator",
        choices=["default", "no-trim"],
        default="default",
        help="glibc allocator: 'default' leaves glibc as it is, as a user's process runs; 'no-trim' keeps "
        "freed memory (no first-touch page faults), for comparison. Recorded with the results.",
    )


def main(args):
    from .. import bench

    return bench.run(args, open_output=open_output, write_output=write_output)
