"""File and folder names of an index directory (see ``simret.retrieval.indexdir`` for the layout)."""

META, STORE, INDEX_FILE, WHITENING_FILE, SKIPPED = (
    "meta.json", "descriptors.h5", "index.faiss", "whitening.npz", "skipped.tsv")
PUBLIC_FILES = (META, STORE, INDEX_FILE, WHITENING_FILE, SKIPPED)  # DIR/<name> → the current generation's file
PARTIAL = ".partial"  # finished chunks of an interrupted extraction
GENERATIONS = "generations"  # one folder per generation
CURRENT = "current"  # symlink → generations/<id>: replacing it commits a generation
STORE_ONLY = "none"  # index kind of a directory that keeps the descriptor store alone (no FAISS index)
FILE_KEYS = {"descriptors": STORE, "index": INDEX_FILE, "whitening": WHITENING_FILE, "skipped": SKIPPED}
