"""Keeping the files named by dataset and list files inside their root folder.

A dataset file (a few-shot CSV, a folder split, a Revisited ground truth, the R1M list) comes from
elsewhere; the files it names must lie in the folder it belongs to, its *root*. So an entry must be a
relative path without ``..`` (``check_relative``), and once symbolic links are followed it must still lie
inside the root (``RootGuard``). The root itself is resolved first, so it may be a symbolic link (a
dataset kept on another disk). What breaks these rules is refused with ``OutsideRootError``, which
names the file and the row (``file:line``, ``imlist[i]``, ``query q``).
"""
from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Dict, FrozenSet, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]
_SEPARATORS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"^[A-Za-z]:")


class OutsideRootError(ValueError):
    """A listed path that would make simret read a file outside the folder it belongs to."""


def check_relative(entry: str, where: str, root: PathLike) -> str:
    """``entry`` as written in a dataset file, if it is a relative path that stays in ``root``.

    ``where`` names the row for the message (``test.csv:12``, ``gnd_x.pkl: imlist[3]``).

    Raises:
        OutsideRootError: an absolute path (``/x``, ``\\x``, ``C:x``), a ``..`` component (``/`` or ``\\``
            separated), or a NUL character.
    """
    if "\x00" in entry:
        raise OutsideRootError(f"{where}: {entry!r} holds a NUL character: not a file name")
    if entry.startswith(("/", "\\")) or _DRIVE.match(entry):
        raise OutsideRootError(f"{where}: {entry!r} is an absolute path: entries must be paths relative to {root}")
    if ".." in _SEPARATORS.split(entry):
        raise OutsideRootError(f"{where}: {entry!r} climbs out with '..': entries must be paths relative to {root}, "
                               f"inside it")
    return entry


def is_within(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or lies under it (both already ``os.path.realpath``)."""
    if path == root:
        return True
    return path.startswith(root if root.endswith(os.sep) else root + os.sep)


def leaves_root(path: PathLike, real_root: str) -> Optional[str]:
    """The resolved target of ``path`` if it lies outside ``real_root`` (resolved), else None."""
    target = os.path.realpath(path)
    return None if is_within(target, real_root) else target


class RootGuard:
    """Tells which relative paths under a root resolve outside it, for thousands to millions of paths.

    Each folder is resolved once and listed once (``os.scandir``: no ``stat`` per file) to learn which of
    its entries are symbolic links; only those are resolved. Costs about one directory read per folder.
    """

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        self.real_root = os.path.realpath(root)
        self._folders: Dict[str, Tuple[str, bool, FrozenSet[str]]] = {}

    def outside(self, relative: str) -> Optional[str]:
        """Where ``root/relative`` really is, if that is outside the root; None if it is inside (or absent).

        ``relative`` must already have passed ``check_relative`` (no ``..``, not absolute).
        """
        parent, name = posixpath.split(relative.replace("\\", "/") if os.sep == "\\" else relative)
        real_parent, inside, links = self._folder(parent)
        if not inside:
            return os.path.join(real_parent, name)
        if name in links:
            return leaves_root(os.path.join(real_parent, name), self.real_root)
        return None

    def _folder(self, parent: str) -> Tuple[str, bool, FrozenSet[str]]:
        known = self._folders.get(parent)
        if known is None:
            real = os.path.realpath(os.path.join(self.real_root, parent)) if parent else self.real_root
            inside = is_within(real, self.real_root)
            links: FrozenSet[str] = frozenset()
            if inside:
                try:
                    with os.scandir(real) as entries:
                        links = frozenset(entry.name for entry in entries if entry.is_symlink())
                except OSError:  # absent or unreadable: nothing there can lead elsewhere
                    pass
            known = self._folders[parent] = (real, inside, links)
        return known

    def refuse(self, relative: str, where: str) -> None:
        """Raise ``OutsideRootError`` naming ``where`` if ``root/relative`` resolves outside the root."""
        target = self.outside(relative)
        if target is not None:
            raise OutsideRootError(f"{where}: {relative!r} leads outside {self.root} (a symbolic link to "
                                   f"{target}): simret reads no file outside the dataset's folder")
