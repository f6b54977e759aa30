"""argparse value types shared by the ``dg-stream`` commands (no torch imported here)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["int_list"]


def int_list(minimum: int, example: str) -> Callable[[str], tuple[int, ...]]:
    """A parser for comma-separated integers, each at least ``minimum``, e.g. ``4,8,16``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers like {example}, not {text!r}"
            ) from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(
                f"expected integers of at least {minimum} like {example}, not {text!r}"
            )
        return values

    return parse
