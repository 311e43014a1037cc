"""What a run shows on the console: one progress line (tomograms done, with slices and prompts
after it; on a terminal only, so a log file or a CI console gets the closing summary, not a bar
per update), and :func:`stderr_to_log` for native libraries' notices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile


class Progress:
    """One progress line for the whole run; ``add`` counts work of any stage."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self._bar = None

    def add(self, stage: str, total: int = 0, done: int = 0) -> None:
        self.totals[stage] = self.totals.get(stage, 0) + total
        self.done[stage] = self.done.get(stage, 0) + done
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=0, desc="tomograms", unit="", dynamic_ncols=True, leave=True)
        bar = self._bar
        bar.total = self.totals.get("tomograms", 0)
        bar.n = self.done.get("tomograms", 0)
        bar.set_postfix_str(", ".join(f"{s} {self.done[s]}/{self.totals[s]}" for s in self.totals
                                      if s != "tomograms" and self.totals[s]), refresh=False)
        bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@contextlib.contextmanager
def stderr_to_log(what: str, log: logging.Logger):
    """Send what native code writes to stderr (file descriptor 2) to the log at INFO meanwhile;
    if the block fails, it goes back to stderr with the error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        text = captured.read().decode(errors="replace").strip()
        if text:
            log.info("%s: %s", what, text)
