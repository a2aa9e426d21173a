"""Generations: how a writer replaces an index directory's files so that readers never see a mixed state.

::

    DIR/generations/<id>/     meta.json, descriptors.h5, index.faiss, whitening.npz, skipped.tsv of one run
    DIR/current               symlink → generations/<id>: the committed generation
    DIR/meta.json …           symlinks → current/meta.json …: plain paths keep working (h5py, scripts)

A writer builds the next generation in ``generations/.<id>.tmp/``, flushes it to disk, renames the folder
to ``generations/<id>/`` and then replaces the ``current`` symlink in one atomic rename: that rename is the
commit. Before it, readers see the previous generation; after it, the new one; a crash in between leaves
a folder the next writer removes. Readers resolve ``current`` once and read every file from that folder;
older generations are removed by the writer right after its commit (a reader that still has their files
open keeps reading them; one that resolved ``current`` just before and finds them gone resolves again).

Directories written before generations existed (format 1: the files themselves in DIR) are read as they
are; the next commit turns them into this layout.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Union

from simret.retrieval.indexdir.names import CURRENT, GENERATIONS, META, PARTIAL, PUBLIC_FILES
from simret.utils.atomic import deferred_interrupts, fsync_path, remove_temporaries
from simret.utils.logs import get_logger

log = get_logger(__name__)
PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Generation:
    """One committed generation: the folder holding its files (the index directory itself in format 1)."""

    out: Path
    directory: Path
    name: str  # the folder's name (the generation id); "" for a format-1 directory

    def file(self, name: str) -> Path:
        return self.directory / name

    def shown(self, name: str) -> Path:
        """The public path of a file, for messages (``DIR/index.faiss``)."""
        return self.out / name


def current(out: PathLike) -> Optional[Generation]:
    """The committed generation of ``out`` (None: no index there)."""
    out = Path(out)
    link = out / CURRENT
    if link.is_symlink():
        target = Path(os.readlink(link))
        directory = target if target.is_absolute() else out / target
        return Generation(out, directory, directory.name)
    if link.is_dir():  # a copy made by a tool that followed the symlink
        return Generation(out, link, CURRENT)
    if (out / META).is_file():
        return Generation(out, out, "")
    return None


def is_dangling(generation: Optional[Generation]) -> bool:
    """Whether ``generation`` is named by the ``current`` link but its folder does not exist (a damaged
    directory: commits never remove the generation ``current`` names)."""
    return generation is not None and bool(generation.name) and generation.name != CURRENT \
        and not generation.directory.is_dir()


def newest_complete(out: PathLike) -> Optional[Generation]:
    """The newest finished generation folder of ``out`` holding a meta.json (None: none), whatever
    ``current`` says: what a writer falls back to when ``current`` names a folder that is gone."""
    out = Path(out)
    folder = out / GENERATIONS
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / META).is_file()) \
        if folder.is_dir() else []
    return Generation(out, folder / names[-1], names[-1]) if names else None


def current_generation(out: PathLike) -> Optional[str]:
    """The id of the committed generation (cheap: one ``readlink``), for readers that poll for changes."""
    found = current(out)
    if found is None:
        return None
    if found.name and found.name != CURRENT:
        return found.name
    try:
        return str(json.loads(found.file(META).read_text(encoding="utf-8")).get("generation"))
    except (OSError, ValueError):
        return None


def new_generation_id(sequence: int) -> str:
    """``<sequence, 6 digits>-<8 hex>``: sorts by age, unique across writers."""
    return f"{sequence:06d}-{uuid.uuid4().hex[:8]}"


class NewGeneration:
    """The next generation being written: files go into ``path(name)``; ``commit()`` publishes them all at
    once; leaving the ``with`` block without committing (an error, Ctrl-C) removes them."""

    def __init__(self, out: PathLike, generation_id: str) -> None:
        self.out = Path(out)
        self.name = generation_id
        self.directory = self.out / GENERATIONS / f".{generation_id}.tmp"
        self.directory.mkdir(parents=True)
        self.committed: Optional[Generation] = None

    def path(self, name: str) -> Path:
        return self.directory / name

    def commit(self) -> Generation:
        """Flush every file, then make this generation the current one (one atomic rename)."""
        for path in self.directory.iterdir():
            fsync_path(path)
        fsync_path(self.directory)
        final = self.out / GENERATIONS / self.name
        os.rename(self.directory, final)
        fsync_path(final.parent)
        with deferred_interrupts():  # the swap and the public links go together
            _swap_current(self.out, Path(GENERATIONS) / self.name)
            self.committed = Generation(self.out, final, self.name)  # from here on, the new generation is current
            try:
                _link_public_files(self.out, final)
            except OSError as err:  # readers go through `current`; the next write links the names again
                log.warning("%s is committed, but its public names could not all be linked (%s): the next write of "
                            "it links them", self.out, err)
        remove_stale(self.out)
        return self.committed

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> NewGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.committed is None:
            self.discard()


def _swap_current(out: Path, target: Path) -> None:
    link = out / CURRENT
    if link.is_dir() and not link.is_symlink():  # a copied folder where the link should be: set it aside
        link.rename(out / GENERATIONS / f".copied-{uuid.uuid4().hex[:8]}.tmp")
    temporary = out / f".{CURRENT}.{uuid.uuid4().hex[:8]}.tmp"
    os.symlink(target, temporary)
    os.replace(temporary, link)
    fsync_path(out)


def _link_public_files(out: Path, generation: Path) -> None:
    """``DIR/<name>`` → ``current/<name>`` for the files this generation has; stale names removed."""
    for name in PUBLIC_FILES:
        public = out / name
        if (generation / name).exists():
            if public.is_symlink() and os.readlink(public) == f"{CURRENT}/{name}":
                continue
            temporary = out / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
            os.symlink(f"{CURRENT}/{name}", temporary)
            os.replace(temporary, public)  # also replaces a format-1 file atomically
        elif public.is_symlink() or public.is_file():
            public.unlink()


def remove_stale(out: PathLike) -> List[str]:
    """Remove what no reader of the committed generation needs: other generations, unfinished ones, and
    temporaries (``.*.tmp``) left in DIR or in its checkpoints by a killed run. Writers call this with
    the writer lock held. Returns the names removed."""
    out = Path(out)
    committed = current(out)
    keep = committed.directory.resolve() if committed is not None else None
    dangling = is_dangling(committed)  # damaged: keep every finished generation, the repair may need one
    removed: List[str] = []
    folder = out / GENERATIONS
    if folder.is_dir():
        for entry in folder.iterdir():
            if (keep is not None and entry.resolve() == keep) or (dangling and not entry.name.startswith(".")):
                continue
            _remove(entry)
            removed.append(f"{GENERATIONS}/{entry.name}")
    if committed is not None and committed.name and committed.name != CURRENT and not dangling:
        with contextlib.suppress(OSError):  # names a killed commit did not link yet (only a convenience)
            _link_public_files(out, committed.directory)
    for place in (out, out / PARTIAL):
        removed += [str((place / name).relative_to(out)) for name in remove_temporaries(place)]
    if removed:
        log.debug("%s: removed %s", out, ", ".join(removed))
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def link_file(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source``: a hard link (generations share unchanged files, which
    are never modified once committed), or a copy where hard links are impossible."""
    try:
        os.link(source, target)
    except OSError as err:
        log.debug("cannot hard-link %s (%s): copying it", source, err)
        shutil.copyfile(source, target)


def generation_files(generation: Generation) -> Iterator[Path]:
    """The public files this generation holds."""
    for name in PUBLIC_FILES:
        if generation.file(name).is_file():
            yield generation.file(name)
