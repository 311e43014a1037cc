"""The Ray driver's schedule state: what each finished ref was, and where each tomogram stands.

Plain dataclasses (no Ray here); :mod:`cryosam_ray.executors.on_ray` holds the rules that move
a tomogram from one stage to the next.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from cryosam_ray.errors import CryoSamError
from cryosam_ray.job import TomogramHeader
from cryosam_ray.plan import TomogramRecord
from cryosam_ray.tables import Point


class StallError(CryoSamError):
    """No work finished for ``ray.stall_timeout_s``: the cluster cannot place what is left."""


class Event(enum.Enum):
    """What a finished ref was."""

    HEADER = "header"  # tomogram validated, statistics computed
    LAYOUT = "layout"  # its feature layout under the encoder
    SHARD = "encode"  # a feature shard committed
    EMBED = "embed"  # a SAM embedding shard committed
    PROMPTS = "prompts"  # its prompt particles segmented
    PARTS = "parts"  # its share of the class queries
    MATCH = "match"  # proposals of every class
    FIND = "propagate"  # its particles found (proposals propagated)
    FINISH = "finish"  # masks and preview written


@dataclass
class TomoState:
    """Where one tomogram stands in the run (counters count work not yet committed)."""

    name: str
    record: TomogramRecord
    points: list[Point]
    query_only: bool  # done before: only its prompts are needed, for the queries
    header: TomogramHeader | None = None
    group_url: str = ""
    features_left: int | None = None  # None until its feature group is opened
    embeddings_left: int = 0
    prompts_ref: object = None
    prompts_done: bool = False
    parts_sent: bool = False
    matched: bool = False
    proposals_ref: object = None  # a match result waiting for the SAM embeddings
    proposals: dict[str, int] = field(default_factory=dict)
    closed: bool = False  # finished, failed, or (query_only) its parts are in
    error: str = ""  # why it failed

    @property
    def encoded(self) -> bool:
        return self.features_left == 0

    @property
    def embedded(self) -> bool:
        return self.header is not None and self.embeddings_left == 0


@dataclass
class Pending:
    tomo: TomoState
    event: Event
    slices: int = 0  # shards: slices, for the progress display
    pool: object = None  # the actor pool that runs it (its load is released when it is done)
    since: float = field(default_factory=time.perf_counter)
