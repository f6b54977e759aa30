"""Checks that the installed versions are dg-stream's declared floors (``nox -s floors``).

After ``uv pip install --resolution lowest-direct -e '.[EXTRAS]'`` every direct dependency
should sit exactly at its ``>=`` floor. One that resolved higher has a floor that cannot be
installed (another package needs more), so the declared range claims versions never tested:
raise that floor. Prints the tested ranges; exits 1 on a mismatch.

Usage: python scripts/check_floors.py EXTRA[,EXTRA...] [--pinned NAME ...] [--tools NAME ...]
(--pinned: installed at a chosen version, not its floor; --tools: names from the dev extra,
held to their floors too)
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def declared(extras: set[str], tools: set[str]) -> list[Requirement]:
    """dg-stream's direct requirements for ``extras`` (extras that name other extras count),
    and those of the dev extra named in ``tools``."""
    requirements = [Requirement(text) for text in metadata.requires("dg-stream") or []]
    wanted, seen = set(extras), set()
    while wanted - seen:
        extra = (wanted - seen).pop()
        seen.add(extra)
        for req in requirements:
            if canonicalize_name(req.name) == "dg-stream" and _applies(req, extra):
                wanted |= set(req.extras)
    return [
        req
        for req in requirements
        if canonicalize_name(req.name) != "dg-stream"
        and (
            req.marker is None
            or any(_applies(req, extra) for extra in seen)
            or (canonicalize_name(req.name) in tools and _applies(req, "dev"))
        )
    ]


def _applies(req: Requirement, extra: str) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": extra})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", help="comma-separated extras, e.g. local,server")
    parser.add_argument("--pinned", nargs="*", default=[], metavar="NAME")
    parser.add_argument("--tools", nargs="*", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    skip = {canonicalize_name(name) for name in args.pinned}
    tools = {canonicalize_name(name) for name in args.tools}
    requirements = declared(set(args.extras.split(",")), tools)
    missing = tools - {canonicalize_name(req.name) for req in requirements}
    if missing:
        print(f"not in the dev extra: {', '.join(sorted(missing))}")
        return 1
    bad = 0
    for req in sorted(requirements, key=lambda r: r.name.lower()):
        installed = Version(metadata.version(req.name))
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        at_floor = not floors or Version(installed.base_version) == max(floors)
        note = ""
        if canonicalize_name(req.name) in skip:
            note = "  (pinned, not at its floor)"
        elif not at_floor:
            note = "  <- not its floor: raise the floor to the version that installs"
            bad += 1
        print(f"{req.name:16} {req.specifier!s:14} tested at {installed}{note}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
