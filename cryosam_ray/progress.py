"""The run's progress display on the console: one bar per stage (tomograms, slices, prompts)."""

from __future__ import annotations


class Progress:
    """One progress display per stage on the driver (tomograms, slices, prompts)."""

    def __init__(self, enabled: bool):
        self.bars = {}
        self.enabled = enabled

    def add(self, stage: str, total: int = 0, done: int = 0) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage not in self.bars:
            self.bars[stage] = tqdm(total=0, desc=stage, unit="", position=len(self.bars), leave=True)
        bar = self.bars[stage]
        bar.total += total
        bar.update(done)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
