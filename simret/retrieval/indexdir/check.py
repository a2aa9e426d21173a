"""``simret check DIR``: verify an index directory without changing it.

Checks, in order: the committed generation and its format; meta.json; every file it names is there and
matches its recorded checksum (index.faiss, whitening.npz, skipped.tsv) and every chunk of the store its
HDF5 checksum; the counts (store rows, meta, FAISS vectors) and dimensions agree; the generation and the
encoder fingerprint tie the files together; and, unless ``images=False``, every indexed image is still
there and unchanged (size and modification time; with ``verify_content`` also its SHA-256, where the store
has one). Nothing here needs torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Union

import numpy as np

from simret.retrieval.indexdir.layout import current, is_dangling
from simret.retrieval.indexdir.names import (
    CURRENT,
    GENERATIONS,
    INDEX_FILE,
    PARTIAL,
    PUBLIC_FILES,
    STORE_ONLY,
    WHITENING_FILE,
)
from simret.retrieval.indexdir.plan import path_key
from simret.retrieval.indexdir.previous import Previous, load_previous
from simret.utils.filestate import MISSING, stat_files

PathLike = Union[str, os.PathLike]
SHOWN = 3  # example ids per problem


@dataclass
class CheckReport:
    """What ``check_index_dir`` found: ``problems`` (anything wrong: exit status 1) and ``facts``."""

    path: Path
    problems: List[str] = field(default_factory=list)
    facts: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # harmless findings (leftovers the next write removes)
    store_damaged: bool = False  # descriptor rows lost: only describing the images again brings them back

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"{self.path}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"]
        lines += [f"  {fact}" for fact in self.facts]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  PROBLEM: {problem}" for problem in self.problems]
        if not self.ok and self.store_damaged:
            lines.append("  repair: run your simret index command again: it describes the damaged entries again "
                         f"(simret check {self.path} --repair would drop them)")
        elif not self.ok:
            lines.append(f"  repair: simret check {self.path} --repair rebuilds index, whitening and meta.json "
                         f"from the stored descriptors; images that changed or vanished need your simret index "
                         f"command again")
        return "\n".join(lines)


def check_index_dir(path: PathLike, *, images: bool = True, verify_content: bool = False) -> CheckReport:
    """Verify the index directory ``path`` (see the module docstring)."""
    out = Path(path).expanduser()
    report = CheckReport(out)
    if not out.is_dir():
        report.problems.append(f"no directory {out}")
        return report
    if current(out) is None:
        report.problems.append(f"{out} holds no simret index (no meta.json)")
        return report
    previous = load_previous(out, quiet=True)
    try:
        report.problems.extend(previous.problems)
        report.store_damaged = previous.store is None or not bool(previous.usable.all())
        if previous.meta is not None:
            _describe(report, previous)
            _check_index(report, previous)
        if previous.store is not None and images:
            _check_images(report, previous, verify_content)
        _leftovers(report, out)
    finally:
        previous.close()
    return report


def _describe(report: CheckReport, previous: Previous) -> None:
    meta = previous.meta
    report.facts.append(f"generation {meta['generation']} (format {previous.format_version}), "
                        f"updated {meta.get('updated', meta.get('created', '?'))}")
    report.facts.append(f"{meta['count']} images, {meta['skipped']} skipped; encoder {meta['fingerprint']}; "
                        f"{meta['index']['kind']} index, {meta['index']['dim']}-d; whitening "
                        f"{meta['whitening'].get('kind', 'none')}")
    if previous.store is not None and previous.attrs.get("fingerprint") != meta["fingerprint"]:
        report.problems.append(f"the store's fingerprint {previous.attrs.get('fingerprint')} is not meta.json's "
                               f"{meta['fingerprint']}")


def _check_index(report: CheckReport, previous: Previous) -> None:
    """The FAISS index holds one vector per stored row, of the recorded width."""
    meta, generation = previous.meta, previous.generation
    if meta["index"].get("kind") == STORE_ONLY or not previous.index_ok:
        return
    from simret.retrieval.index import Index

    try:
        index = Index.load(generation.file(INDEX_FILE))
    except ValueError as err:
        report.problems.append(f"{generation.shown(INDEX_FILE)}: {err}")
        return
    if index.ntotal != meta["count"]:
        report.problems.append(f"{generation.shown(INDEX_FILE)} holds {index.ntotal} vectors, meta.json says "
                               f"{meta['count']}")
    if index.dim != int(meta["index"]["dim"]):
        report.problems.append(f"{generation.shown(INDEX_FILE)} is {index.dim}-d, meta.json says "
                               f"{meta['index']['dim']}-d")
    if meta["whitening"].get("kind") == "pca" and previous.whitening_ok:
        from simret.retrieval.whitening import PCAWhitening

        whitening = PCAWhitening.load(generation.file(WHITENING_FILE))
        if whitening.in_dim != int(meta["dim"]) or whitening.out_dim != index.dim:
            report.problems.append(f"{generation.shown(WHITENING_FILE)} maps {whitening.in_dim}-d to "
                                   f"{whitening.out_dim}-d, not {meta['dim']}-d to {index.dim}-d")


def _check_images(report: CheckReport, previous: Previous, verify_content: bool) -> None:
    """Every indexed image still exists and is unchanged since it was described."""
    root = previous.root or Path()
    keys = [path_key(root, image_id) for image_id in previous.ids]
    now = stat_files(keys, digests=verify_content)
    stored = previous.states
    missing = np.flatnonzero(now.sizes == MISSING)
    known = (stored.sizes != MISSING) & (now.sizes != MISSING)
    changed = np.flatnonzero(known & ((stored.sizes != now.sizes) | (stored.mtimes != now.mtimes)))
    if verify_content:
        differs = [i for i in np.flatnonzero(known).tolist()
                   if stored.digests[i] and now.digests[i] and stored.digests[i] != now.digests[i]]
        changed = np.union1d(changed, np.asarray(differs, dtype=np.int64))
    unknown = int((stored.sizes == MISSING).sum())
    if len(missing):
        report.problems.append(f"{len(missing)} indexed image(s) no longer exist, e.g. "
                               f"{', '.join(previous.ids[i] for i in missing[:SHOWN])}")
    if len(changed):
        report.problems.append(f"{len(changed)} indexed image(s) changed since they were described, e.g. "
                               f"{', '.join(previous.ids[i] for i in changed[:SHOWN])} (run simret index again)")
    checked = len(keys) - len(missing) - len(changed)
    report.facts.append(f"{checked} of {len(keys)} images present and unchanged"
                        + (" (content digests compared)" if verify_content else " (sizes and times compared)")
                        + (f"; {unknown} described before simret recorded file states" if unknown else ""))


def _leftovers(report: CheckReport, out: Path) -> None:
    committed = current(out)
    folder = out / GENERATIONS
    others = [p.name for p in folder.iterdir() if p.resolve() != committed.directory.resolve()
              and not (is_dangling(committed) and not p.name.startswith("."))] if folder.is_dir() else []
    temporaries = [p.name for p in out.glob(".*.tmp")]
    if others or temporaries:
        report.notes.append(f"left by an interrupted write, removed by the next one: {', '.join(others + temporaries)}")
    if committed.name and committed.name != CURRENT and committed.directory.is_dir():
        stale = [name for name in PUBLIC_FILES if (committed.directory / name).is_file()
                 and not ((out / name).is_symlink() and os.readlink(out / name) == f"{CURRENT}/{name}")]
        if stale:
            report.notes.append(f"{', '.join(stale)} in {out} not linked to the current generation yet (readers use "
                                f"{CURRENT}/; the next write links them)")
    if (out / PARTIAL).is_dir():
        report.notes.append(f"{PARTIAL}/ holds descriptors of an interrupted run (the next simret index reuses them)")
