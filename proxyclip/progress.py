"""Progress bars the command line turns on; the library only calls ``progress(done, total)`` callbacks."""

from __future__ import annotations

import sys


class CountBar:
    """A ``progress(done, total)`` callback that draws a tqdm bar on stderr, e.g.
    ``encoding class names  37/847 [00:12<03:40]``: opened on the first call, closed at ``total``."""

    def __init__(self, desc: str, unit: str = "it", disable: bool = False) -> None:
        self.desc, self.unit, self.disable = desc, unit, disable
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, disable=self.disable,
                            dynamic_ncols=True, leave=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
