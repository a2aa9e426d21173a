"""Data: safe image loading and transforms, Revisited Oxford/Paris, few-shot splits, embedded samples."""
