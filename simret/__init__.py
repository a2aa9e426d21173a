"""simret: image retrieval and few-shot learning with SimPool-pooled timm encoders.

Importing ``simret`` is cheap: torch, timm and faiss are imported by the sub-packages that need them
(``simret.models``, ``simret.retrieval``, ``simret.fewshot``), never here.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
