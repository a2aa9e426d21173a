"""``simret check``: verify an index directory (checksums, counts, generation, fingerprint, images)."""
from __future__ import annotations

import sys
from typing import Optional

import click

from simret.commands.options import lock_timeout_option


@click.command(short_help="Verify an index directory: checksums, counts, images still there (exit 1 if not).")
@click.argument("index_dir", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--images/--no-images", default=True, show_default=True,
              help="Also check that every indexed image still exists and is unchanged (size and time).")
@click.option("--verify-content", is_flag=True,
              help="Compare the images' contents (SHA-256) where the index stored digests (--verify-content).")
@click.option("--repair", is_flag=True,
              help="Rebuild what can be rebuilt from the stored descriptors (index, whitening, meta.json), then "
                   "check again. Damaged store rows are dropped; describing images again needs simret index.")
@lock_timeout_option
def check(index_dir: str, images: bool, verify_content: bool, repair: bool, lock_timeout: Optional[float]) -> None:
    """Verify the index directory DIR and print a report; exit status 1 if anything is wrong.

    \b
    Checked: meta.json (format, generation), the checksum of every file (HDF5 fletcher32 for
    descriptors.h5, SHA-256 for index.faiss, whitening.npz and skipped.tsv), counts and widths
    (store rows = meta.json = FAISS vectors), the store's generation and encoder fingerprint, and
    that the indexed images are still there and unchanged. Nothing is changed unless --repair.
    Needs no model (torch is not loaded).

    \b
    Examples:
      simret check idx/
      simret check idx/ --verify-content         # also compare image contents
      simret check idx/ --repair                 # rebuild a damaged index.faiss / whitening / meta.json
    """
    from simret.retrieval.indexdir.check import check_index_dir

    if repair:
        from simret.retrieval.indexdir import IndexSettings
        from simret.retrieval.indexdir.build import build_from_store
        from simret.utils import progress

        summary = build_from_store(index_dir, IndexSettings(lock_timeout=lock_timeout), progress=progress.is_enabled())
        click.echo(f"repaired: {summary.line()}", err=True)
    report = check_index_dir(index_dir, images=images, verify_content=verify_content)
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)
