"""What ``build_index`` is asked to do (``IndexSettings``) and what it did (``BuildSummary``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from simret.retrieval.indexdir.names import SKIPPED, STORE_ONLY


@dataclass
class IndexSettings:
    """How ``build_index`` computes and indexes descriptors (the ``simret index`` options)."""

    scales: Tuple[float, ...] = (1.0,)
    max_size: Optional[int] = 1024
    kind: str = "auto"
    index_params: Dict[str, Any] = field(default_factory=dict)
    whiten: str = "none"  # "pca" or "none"
    whiten_on: Optional[str] = None  # images (folder / list) or a descriptors .h5; None: the indexed set
    whiten_dim: Optional[int] = None
    precision: str = "fp32"  # fp32|bf16|fp16 (or auto) extraction; bf16/fp16 also store float16 descriptors
    batch_size: int = 16
    workers: Optional[int] = None
    checkpoint_every: int = 2048  # descriptors per resume checkpoint (also every two minutes)
    keep_missing: bool = False  # keep entries under the root whose images are no longer listed
    verify_content: bool = False  # compare content digests, not only sizes and modification times
    lock_timeout: Optional[float] = None  # seconds to wait for another writer (None: as long as it takes)
    max_memory: Optional[int] = None  # bytes the index may take: its kind and parameters are chosen to fit
    max_latency_ms: Optional[float] = None  # per-query search time to tune ivfpq nprobe / hnsw efSearch to
    train_from: Optional[str] = None  # an index directory whose trained index and whitening this one reuses

    def __post_init__(self) -> None:
        if self.whiten not in ("pca", "none"):
            raise ValueError(f"whitening must be 'pca' or 'none', not {self.whiten!r}")
        if self.kind == STORE_ONLY and (self.whiten != "none" or self.index_params):
            raise ValueError("--index none keeps the descriptors only: --whiten and --index-param do not apply")
        if self.whiten == "none" and (self.whiten_on or self.whiten_dim):
            raise ValueError("--whiten-on/--whiten-dim need --whiten pca")


@dataclass
class BuildSummary:
    """What ``build_index`` did."""

    out: Path
    count: int  # descriptors in the index now
    computed: int  # descriptors extracted by this run (re-described ones included)
    reused: int  # taken from the previous store or from an interrupted run's checkpoints
    skipped: int  # listed files that could not be used (skipped.tsv)
    kind: str
    dim: int
    up_to_date: bool = False
    failures: List[Tuple[str, str]] = field(default_factory=list)
    redescribed: int = 0  # stored images whose files changed, described again
    removed: int = 0  # entries whose images are no longer listed under the root
    generation: str = ""

    def line(self) -> str:
        if self.up_to_date:
            return (f"{self.out}: up to date ({self.count} images, {self.kind} index, {self.dim}-d; "
                    f"{self.skipped} skipped)")
        skipped = f", {self.skipped} skipped (see {self.out / SKIPPED})" if self.skipped else ", 0 skipped"
        return (f"indexed {self.count} images into {self.out} ({self.computed} computed, {self.reused} reused, "
                f"{self.redescribed} re-described, {self.removed} removed{skipped}); {self.kind} index, {self.dim}-d")
