"""One progress-bar style for every long command: live on a terminal, sparse in log files."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], **kwargs: object) -> tqdm:
    # Logs (CI, `ray job logs`) get a line every 10 s instead of every carriage-return redraw.
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.2 if interactive else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, file=sys.stderr, **kwargs)  # type: ignore[call-overload]
