"""Small helpers shared by every sub-package (no heavy imports at module level)."""
