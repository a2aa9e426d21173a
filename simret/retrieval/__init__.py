"""Retrieval: descriptor extraction, whitening, HDF5 store, FAISS index, re-ranking, Revisited metrics."""
