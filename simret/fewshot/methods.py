"""Few-shot classifiers, batched over episodes: ``get_method(name, **kw)`` → a callable

    method(support (E, S, D), support_labels (E, S), query (E, Q, D)) → scores (E, Q, n_way)

higher is better; ``n_way = support_labels.max() + 1`` (pass ``n_way=`` to say it explicitly). Inputs may be
NumPy arrays or torch tensors (any device); the scores come back as the same kind (torch: on the inputs'
device and dtype). Every class ``0..n_way-1`` needs at least one support example. The order of the support
examples within an episode does not change the scores (up to floating-point rounding).

Methods and their exact protocols:

``protonet``   Snell et al. 2017: class means of the support features; score = **minus the Euclidean
               distance** ``-‖q − μ_c‖`` (as easyfsl's ``PrototypicalNetworks``, ``-cdist``; the paper's squared
               distance ranks classes the same way: ``metric="sqeuclidean"`` gives it). Raw features, no
               normalisation.
``cosine``     cosine similarity ``q·μ_c / (‖q‖‖μ_c‖)`` to the class means of the **raw** support features
               (the means are taken before any normalisation).
``simpleshot`` Wang et al. 2019, CL2N: subtract the base-split mean (``base_mean=``, the mean feature of the
               training split), L2-normalise, then nearest class mean: score = ``-‖q̃ − μ̃_c‖`` (Euclidean) where ``μ̃_c``
               is the mean of the normalised support features. ``norm="l2n"`` or ``"un"`` give the paper's
               other variants. **Without ``base_mean``** CL2N is impossible: a ``MissingBaseMeanWarning`` is
               issued and the method falls back to L2N (no centring).
``logreg``     logistic regression per episode (the protocol of Tian et al. 2020, "Rethinking few-shot"):
               L2-normalised features (CL2N when ``base_mean`` is given), scikit-learn
               ``LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=0)``, multinomial;
               scores are its logits (``decision_function``; for 2-way ``[-d/2, d/2]``), whose softmax is the
               predicted probability. Episodes run in parallel with joblib (``n_jobs``, default all cores);
               the result does not depend on ``n_jobs``.
``softkmeans`` transductive, Ren et al. 2018: prototypes from the support, then ``steps`` soft k-means
               refinements with the unlabelled queries: ``z_qc = softmax_c(-‖q − μ_c‖² / temperature)``,
               ``μ_c ← (Σ_{s∈c} s + Σ_q z_qc q) / (K_c + Σ_q z_qc)``; score = ``-‖q − μ_c‖²`` to the refined
               prototypes. Features are CL2N-normalised when ``base_mean`` is given, else L2-normalised
               (``norm=`` overrides), so the default temperature (0.1) fits distances in [0, 4]. The scores of
               one query depend on the other queries of its episode (that is what transductive means).
``bdcspn``, ``tim``, ``laplacianshot``, ``ptmap``
               transductive BD-CSPN, TIM-GD, LaplacianShot and PT-MAP, each equal episode by episode to
               easyfsl's module of the same name: see ``simret.fewshot.transductive``.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

Array = Union[np.ndarray, torch.Tensor]
NORMS = ("none", "un", "l2n", "cl2n")


class MissingBaseMeanWarning(UserWarning):
    """CL2N was asked for without the base-split mean: the method falls back to L2N."""


# ------------------------------------------------------------------------------------------- helpers


def as_tensor(x: Array, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    """NumPy array or tensor → tensor (no copy when possible)."""
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return tensor.to(device=device or tensor.device, dtype=dtype or tensor.dtype)


def normalise(x: torch.Tensor, norm: str, base_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``none``/``un``: unchanged; ``l2n``: ``x / ‖x‖``; ``cl2n``: ``(x − m) / ‖x − m‖`` with ``m = base_mean``."""
    if norm in ("none", "un"):
        return x
    if norm == "cl2n":
        if base_mean is None:
            raise ValueError("norm='cl2n' needs base_mean")
        x = x - base_mean.to(device=x.device, dtype=x.dtype)
    elif norm != "l2n":
        raise ValueError(f"unknown norm {norm!r}: use {', '.join(NORMS)}")
    return torch.nn.functional.normalize(x, dim=-1, eps=1e-12)


def one_hot(labels: torch.Tensor, n_way: int, dtype: torch.dtype) -> torch.Tensor:
    """``(E, S)`` int labels → ``(E, S, n_way)`` one-hot of ``dtype``."""
    return torch.nn.functional.one_hot(labels, n_way).to(dtype)


def class_means(support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Prototypes: ``(E, S, D)``, ``(E, S)`` → ``(E, n_way, D)`` mean support feature of every class."""
    onehot = one_hot(support_labels, n_way, support.dtype)  # (E, S, W)
    sums = torch.bmm(onehot.transpose(1, 2), support)  # (E, W, D)
    return sums / onehot.sum(1).unsqueeze(-1)


def squared_distances(query: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``(E, Q, D)``, ``(E, W, D)`` → ``(E, Q, W)`` squared Euclidean distances (never negative)."""
    q2 = (query * query).sum(-1, keepdim=True)  # (E, Q, 1)
    c2 = (centres * centres).sum(-1).unsqueeze(1)  # (E, 1, W)
    return torch.baddbmm(q2 + c2, query, centres.transpose(1, 2), alpha=-2).clamp_min_(0)


def distances(query: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``(E, Q, D)``, ``(E, W, D)`` → ``(E, Q, W)`` Euclidean distances."""
    return squared_distances(query, centres).sqrt_()


METRICS = ("euclidean", "sqeuclidean", "cosine")


def check_inputs(support: Array, support_labels: Array, query: Array,
                 n_way: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Validate shapes and labels; returns tensors ``(support, labels int64, query, n_way)``.

    Raises:
        ValueError: wrong ranks or sizes, labels outside ``0..n_way-1``, a class without support.
    """
    support_t, query_t = as_tensor(support), as_tensor(query)
    labels_t = as_tensor(support_labels).to(device=support_t.device)
    if support_t.ndim != 3 or query_t.ndim != 3 or labels_t.ndim != 2:
        raise ValueError(f"expected support (E, S, D), support_labels (E, S), query (E, Q, D); got "
                         f"{tuple(support_t.shape)}, {tuple(labels_t.shape)}, {tuple(query_t.shape)}")
    if labels_t.shape != support_t.shape[:2] or query_t.shape[0] != support_t.shape[0] \
            or query_t.shape[2] != support_t.shape[2]:
        raise ValueError(f"shapes do not match: support {tuple(support_t.shape)}, support_labels "
                         f"{tuple(labels_t.shape)}, query {tuple(query_t.shape)}")
    if labels_t.is_floating_point() or labels_t.dtype == torch.bool:
        raise ValueError(f"support_labels must be integers, got {labels_t.dtype}")
    if not support_t.is_floating_point():
        support_t = support_t.float()
    query_t = query_t.to(device=support_t.device, dtype=support_t.dtype)
    labels_t = labels_t.long()
    if labels_t.numel() == 0:
        raise ValueError("empty support set")
    low, high = int(labels_t.min()), int(labels_t.max())
    n_way = high + 1 if n_way is None else int(n_way)
    if low < 0 or high >= n_way:
        raise ValueError(f"support_labels must lie in 0..{n_way - 1}, found {low}..{high}")
    present = one_hot(labels_t, n_way, torch.int64).sum(1)  # (E, W)
    if bool((present == 0).any()):
        episode, label = (int(v) for v in torch.nonzero(present == 0)[0])
        raise ValueError(f"episode {episode} has no support example of class {label} (n_way={n_way})")
    return support_t, labels_t, query_t, n_way


def _like(scores: torch.Tensor, reference: Array) -> Array:
    return scores if isinstance(reference, torch.Tensor) else scores.cpu().numpy()


# ------------------------------------------------------------------------------------------- methods


class FewShotMethod:
    """Base class: ``__call__`` checks and converts, ``scores`` computes on tensors."""

    name = "method"
    transductive = False

    def __call__(self, support: Array, support_labels: Array, query: Array, n_way: Optional[int] = None) -> Array:
        support_t, labels_t, query_t, n_way = check_inputs(support, support_labels, query, n_way)
        return _like(self.scores(support_t, labels_t, query_t, n_way), support)

    def scores(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
               n_way: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class PrototypeMethod(FewShotMethod):
    """Nearest class mean: features normalised by ``norm``, prototypes = class means, scored by ``metric``.

    ``metric="euclidean"``: ``-‖q − μ_c‖``; ``"sqeuclidean"``: ``-‖q − μ_c‖²``; ``"cosine"``: ``cos(q, μ_c)``.
    ``evaluate`` recognises these methods and scores them straight from the feature bank.
    """

    def __init__(self, name: str, metric: str, norm: str = "none", base_mean: Optional[Array] = None) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}: use {', '.join(METRICS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}: use {', '.join(NORMS)}")
        self.name, self.metric = name, metric
        self.base_mean = None if base_mean is None else _vector(base_mean, "base_mean")
        if norm == "cl2n" and self.base_mean is None:
            warnings.warn(f"{name}: CL2N needs the base-split mean (base_mean=, the mean feature of the training "
                          f"split); without it the features are only L2-normalised (L2N)",
                          MissingBaseMeanWarning, stacklevel=3)
            norm = "l2n"
        if self.base_mean is not None and norm != "cl2n":
            raise ValueError(f"{name}: base_mean is only used with norm='cl2n', not norm={norm!r}")
        self.norm = norm

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """The features this method compares (after its normalisation): ``(..., D)`` → ``(..., D)``."""
        return normalise(features, self.norm, self.base_mean)

    def scores(self, support, support_labels, query, n_way):
        support, query = self.transform(support), self.transform(query)
        prototypes = class_means(support, support_labels, n_way)  # (E, W, D)
        if self.metric == "cosine":
            prototypes = torch.nn.functional.normalize(prototypes, dim=-1, eps=1e-12)
            return torch.bmm(torch.nn.functional.normalize(query, dim=-1, eps=1e-12), prototypes.transpose(1, 2))
        if self.metric == "euclidean":
            return -distances(query, prototypes)
        return -squared_distances(query, prototypes)

    def describe(self) -> str:
        return f"{self.name}: {self.metric}, norm={self.norm}"


class LogisticRegressionMethod(FewShotMethod):
    """scikit-learn logistic regression fitted on each episode's support (see the module docstring)."""

    name = "logreg"

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, norm: Optional[str] = None,
                 base_mean: Optional[Array] = None, n_jobs: Optional[int] = -1) -> None:
        self.C, self.max_iter, self.tol, self.n_jobs = float(C), int(max_iter), float(tol), n_jobs
        self.base_mean = None if base_mean is None else _vector(base_mean, "base_mean")
        self.norm = norm or ("cl2n" if self.base_mean is not None else "l2n")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: use {', '.join(NORMS)}")
        if self.norm == "cl2n" and self.base_mean is None:
            raise ValueError("logreg: norm='cl2n' needs base_mean")

    def scores(self, support, support_labels, query, n_way):
        from joblib import Parallel, delayed

        device, dtype = support.device, support.dtype
        xs = normalise(support, self.norm, self.base_mean).detach().cpu().double().numpy()
        xq = normalise(query, self.norm, self.base_mean).detach().cpu().double().numpy()
        ys = support_labels.cpu().numpy()
        episodes = xs.shape[0]
        workers = _n_workers(self.n_jobs)
        step = max(1, -(-episodes // (4 * workers)))
        options = {"C": self.C, "max_iter": self.max_iter, "tol": self.tol}
        if workers == 1 or episodes <= step:
            parts = [_logreg_batch(xs, ys, xq, n_way, options)]
        else:
            parts = Parallel(n_jobs=workers)(
                delayed(_logreg_batch)(xs[i:i + step], ys[i:i + step], xq[i:i + step], n_way, options)
                for i in range(0, episodes, step))
        return torch.from_numpy(np.concatenate(parts)).to(device=device, dtype=dtype)

    def describe(self) -> str:
        return f"logreg: C={self.C}, norm={self.norm}, lbfgs max_iter={self.max_iter}"


def _n_workers(n_jobs: Optional[int]) -> int:
    import os

    cores = os.cpu_count() or 1
    if n_jobs is None or n_jobs == 0:
        return 1
    return max(1, cores + 1 + n_jobs if n_jobs < 0 else n_jobs)


def _logreg_batch(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, n_way: int, options: Dict[str, Any]) -> np.ndarray:
    """Fit one LogisticRegression per episode: ``(e, S, D)``, ``(e, S)``, ``(e, Q, D)`` → logits ``(e, Q, W)``."""
    from sklearn.linear_model import LogisticRegression

    out = np.empty((xs.shape[0], xq.shape[1], n_way), dtype=np.float64)
    for e in range(xs.shape[0]):
        model = LogisticRegression(solver="lbfgs", random_state=0, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)  # ConvergenceWarning is a UserWarning
            model.fit(xs[e], ys[e])
        logits = model.decision_function(xq[e])
        if logits.ndim == 1:  # two classes: sklearn returns the log-odds of class 1
            logits = np.stack([-logits / 2, logits / 2], axis=1)
        out[e] = logits
    return out


class SoftKMeansMethod(FewShotMethod):
    """Transductive prototype refinement with soft k-means (Ren et al. 2018; see the module docstring)."""

    name = "softkmeans"
    transductive = True

    def __init__(self, steps: int = 1, temperature: float = 0.1, norm: Optional[str] = None,
                 base_mean: Optional[Array] = None) -> None:
        if int(steps) < 0 or float(temperature) <= 0:
            raise ValueError(f"softkmeans needs steps >= 0 and temperature > 0, got {steps}, {temperature}")
        self.steps, self.temperature = int(steps), float(temperature)
        self.base_mean = None if base_mean is None else _vector(base_mean, "base_mean")
        self.norm = norm or ("cl2n" if self.base_mean is not None else "l2n")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: use {', '.join(NORMS)}")
        if self.norm == "cl2n" and self.base_mean is None:
            raise ValueError("softkmeans: norm='cl2n' needs base_mean")

    def scores(self, support, support_labels, query, n_way):
        support, query = normalise(support, self.norm, self.base_mean), normalise(query, self.norm, self.base_mean)
        onehot = one_hot(support_labels, n_way, support.dtype)  # (E, S, W)
        support_sums = torch.bmm(onehot.transpose(1, 2), support)  # (E, W, D)
        support_counts = onehot.sum(1)  # (E, W)
        prototypes = support_sums / support_counts.unsqueeze(-1)
        for _ in range(self.steps):
            assign = torch.softmax(-squared_distances(query, prototypes) / self.temperature, dim=-1)  # (E, Q, W)
            sums = support_sums + torch.bmm(assign.transpose(1, 2), query)
            prototypes = sums / (support_counts + assign.sum(1)).unsqueeze(-1)
        return -squared_distances(query, prototypes)

    def describe(self) -> str:
        return f"softkmeans: {self.steps} step(s), temperature={self.temperature}, norm={self.norm}"


def _vector(value: Array, what: str) -> torch.Tensor:
    tensor = as_tensor(value)
    if tensor.ndim == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 1:
        raise ValueError(f"{what} must be a (D,) vector, got shape {tuple(tensor.shape)}")
    return tensor.float() if not tensor.is_floating_point() else tensor


# ------------------------------------------------------------------------------------------ registry

METHODS: Dict[str, Callable[..., FewShotMethod]] = {
    "protonet": lambda metric="euclidean": PrototypeMethod("protonet", metric, "none"),
    "cosine": lambda: PrototypeMethod("cosine", "cosine", "none"),
    "simpleshot": lambda base_mean=None, norm="cl2n", metric="euclidean": PrototypeMethod("simpleshot", metric, norm,
                                                                                          base_mean),
    "logreg": LogisticRegressionMethod,
    "softkmeans": SoftKMeansMethod,
    # transductive methods matching easyfsl's (simret.fewshot.transductive, imported when first used)
    "bdcspn": lambda **kw: _transductive("BDCSPNMethod", **kw),
    "tim": lambda **kw: _transductive("TIMMethod", **kw),
    "laplacianshot": lambda **kw: _transductive("LaplacianShotMethod", **kw),
    "ptmap": lambda **kw: _transductive("PTMAPMethod", **kw),
}
# options each method takes (for error messages and for callers that pass a shared set of options)
METHOD_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "protonet": ("metric",),
    "cosine": (),
    "simpleshot": ("base_mean", "norm", "metric"),
    "logreg": ("C", "max_iter", "tol", "norm", "base_mean", "n_jobs"),
    "softkmeans": ("steps", "temperature", "norm", "base_mean"),
    "bdcspn": ("norm", "base_mean"),
    "tim": ("steps", "lr", "temperature", "ce_weight", "marginal_weight", "conditional_weight", "norm", "base_mean"),
    "laplacianshot": ("steps", "knn", "lam", "norm", "base_mean"),
    "ptmap": ("steps", "lr", "lam", "power", "post_norm", "norm", "base_mean"),
}


def _transductive(class_name: str, **kwargs: Any) -> FewShotMethod:
    from simret.fewshot import transductive

    return getattr(transductive, class_name)(**kwargs)


def list_methods() -> List[str]:
    return list(METHODS)


def get_method(name: str, **kwargs: Any) -> FewShotMethod:
    """The method ``name`` (``protonet``, ``cosine``, ``simpleshot``, ``logreg``, ``softkmeans``; transductive
    ``bdcspn``, ``tim``, ``laplacianshot``, ``ptmap``: see ``simret.fewshot.transductive``) with options.

    Raises:
        ValueError: an unknown name or an option the method does not take.
    """
    key = str(name).strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown few-shot method {name!r}; known: {', '.join(METHODS)}")
    unknown = sorted(set(kwargs) - set(METHOD_OPTIONS[key]))
    if unknown:
        takes = ", ".join(METHOD_OPTIONS[key]) or "no options"
        raise ValueError(f"method {key!r} does not take {', '.join(unknown)} (it takes: {takes})")
    return METHODS[key](**kwargs)


def method_options(name: str, available: Dict[str, Any]) -> Dict[str, Any]:
    """The subset of ``available`` options that method ``name`` takes (e.g. ``base_mean`` for simpleshot)."""
    return {k: v for k, v in available.items() if k in METHOD_OPTIONS.get(str(name).lower(), ())}
