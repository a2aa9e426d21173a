"""Stage 2 of a build: describe the images the plan needs, checkpointed, sharded under torchrun.

Descriptors go to resume checkpoints as they are computed (every ``checkpoint_every`` images or two
minutes), so an interruption — Ctrl-C, SIGTERM, a crash — loses at most that much work; the next run finds
them through ``Checkpoints.scan``. Under torchrun each rank describes its contiguous share into its own
chunks; the failures and counts of every rank are gathered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from simret.retrieval.indexdir.checkpoints import Checkpoints
from simret.retrieval.indexdir.plan import Plan
from simret.utils import distributed
from simret.utils.atomic import DiskWriteError
from simret.utils.logs import get_logger

log = get_logger(__name__)


@dataclass
class Described:
    """What stage 2 produced (rows are in the checkpoints): failures by path key, and how many were described."""

    failures: Dict[str, str] = field(default_factory=dict)
    computed: int = 0


def describe_missing(plan: Plan, encoder: Any, settings: Any, checkpoints: Checkpoints, *,
                     progress: bool) -> Described:
    """Describe ``plan.todo`` (this rank's share of it under torchrun) into ``checkpoints``."""
    from simret.retrieval.extraction import iter_extract

    todo = plan.todo
    sharded = distributed.is_distributed()
    if sharded:
        share = distributed.shard_indices(len(todo), distributed.rank(), distributed.world_size())
        todo = todo[share.start:share.stop]
    keys: List[str] = [plan.entries[i].key for i in todo]
    states = plan.states.take(todo)
    described = Described()
    try:
        batches = iter_extract(encoder, "/", keys, scales=settings.scales, max_size=settings.max_size,
                               batch_size=settings.batch_size, workers=settings.workers, precision=settings.precision,
                               progress=progress) if keys else ()
        for batch in batches:
            for position, reason in batch.failures:
                described.failures[keys[position]] = reason
            if len(batch.positions):
                positions = batch.positions.tolist()
                checkpoints.add([keys[p] for p in positions], batch.descriptors, states.take(positions),
                                settings.checkpoint_every)
                described.computed += len(positions)
    except DiskWriteError:
        raise  # saving a checkpoint failed: trying again now would fail the same way
    except BaseException:
        try:
            checkpoints.flush()  # keep the work done so far, whatever stopped us
        except Exception as err:  # noqa: BLE001 - never hide the original error
            log.warning("could not save a checkpoint: %s", err)
        raise
    checkpoints.flush()  # the rows the build reads: a failure here fails the build (never an image left out)
    if sharded:
        gathered = distributed.all_gather_object((described.failures, described.computed))  # after every flush
        described = Described({key: reason for part, _ in gathered for key, reason in part.items()},
                              sum(count for _, count in gathered))
    return described
