"""The dead-letter rate cap: stop a worker whose input mostly fails (a bad deploy, not bad data)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from vecpipe.config import DeadLetterConfig
from vecpipe.errors import DeadLetterRateExceeded

__all__ = ["DeadLetterGuard"]


class DeadLetterGuard:
    """Trips when more than ``max_ratio`` of the last ``window`` records, or ``max_consecutive``
    records in a row, went to the dead-letter topic."""

    def __init__(self, cfg: DeadLetterConfig) -> None:
        self.cfg = cfg
        self._recent: deque[bool] = deque(maxlen=cfg.window)
        self._consecutive = 0

    def would_trip(self, outcomes: Sequence[bool]) -> bool:
        """Whether recording ``outcomes`` (True: failed) would trip the cap; records nothing.
        A stage asks before a side effect that only makes sense if it goes on (a chunk gap)."""
        trial = DeadLetterGuard(self.cfg)
        trial._recent.extend(self._recent)
        trial._consecutive = self._consecutive
        try:
            for failed in outcomes:
                trial.record(failed)
        except DeadLetterRateExceeded:
            return True
        return False

    def record(self, failed: bool) -> None:
        """Note one record's outcome; raise :class:`DeadLetterRateExceeded` when over the cap."""
        self._recent.append(failed)
        self._consecutive = self._consecutive + 1 if failed else 0
        if self._consecutive >= self.cfg.max_consecutive:
            raise DeadLetterRateExceeded(
                f"{self._consecutive} records in a row went to the dead-letter topic "
                f"(dead_letter.max_consecutive={self.cfg.max_consecutive}); stopping so that a "
                "bad deploy does not drain the topic. Inspect with 'vecpipe dlq inspect'."
            )
        if len(self._recent) == self._recent.maxlen:
            ratio = sum(self._recent) / len(self._recent)
            if ratio > self.cfg.max_ratio:
                raise DeadLetterRateExceeded(
                    f"{ratio:.0%} of the last {len(self._recent)} records went to the dead-letter "
                    f"topic (dead_letter.max_ratio={self.cfg.max_ratio}); stopping so that a bad "
                    "deploy does not drain the topic. Inspect with 'vecpipe dlq inspect'."
                )
