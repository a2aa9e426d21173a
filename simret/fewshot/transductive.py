"""Transductive few-shot methods, batched over episodes: BD-CSPN, TIM, LaplacianShot, PT-MAP.

Same contract as every method of ``simret.fewshot.methods``: ``method(support (E, S, D), support_labels (E, S),
query (E, Q, D))`` → scores ``(E, Q, n_way)``, higher is better. *Transductive*: the scores of a query depend
on the other queries of its episode (never on other episodes). Each method computes exactly what easyfsl's
module of the same name computes on one episode (``easyfsl.methods``, v1.5; the tests compare them episode by
episode); here all the episodes of a batch run at once. Where easyfsl stops an iteration early for an
episode (LaplacianShot's bound test, PT-MAP's Sinkhorn tolerance) the batched loop keeps a per-episode
*active* mask, so each episode stops at the iteration easyfsl would stop it at.

Feature preprocessing (``norm``, before anything else; as easyfsl's ``feature_centering`` +
``feature_normalization=2``): ``"none"`` raw features, ``"l2n"`` L2-normalised, ``"cl2n"`` minus the base-split
mean (``base_mean=``) then L2-normalised. Passing ``base_mean`` without ``norm`` selects ``"cl2n"``.

Defaults are easyfsl's, except where easyfsl implements the paper's own algorithm and the paper's protocol
fixes another value: then the paper's (each docstring says which).

``bdcspn``         Liu, Song & Qin, "Prototype Rectification for Few-Shot Learning", ECCV 2020. No options.
``tim``            Boudiaf et al., "Transductive Information Maximization for Few-Shot Learning", NeurIPS 2020
                   (TIM-GD, easyfsl's cosine-classifier variant). ``steps=50, lr=1e-4, temperature=10,
                   ce_weight=1, marginal_weight=1, conditional_weight=0.1``.
``laplacianshot``  Ziko et al., "Laplacian Regularized Few-Shot Learning", ICML 2020. ``steps=20, knn=3,
                   lam=0.7``; CL2N features (L2N without ``base_mean``).
``ptmap``          Hu, Gripon & Pateux, "Leveraging the Feature Distribution in Transfer-based Few-Shot
                   Learning", ICANN 2021. ``steps=20, lr=0.2, lam=10, power=0.5, post_norm=True``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from simret.fewshot.methods import NORMS, Array, FewShotMethod, _vector, class_means, normalise, one_hot

SINKHORN_MAX_ITERATIONS = 1000  # easyfsl's MAXIMUM_SINKHORN_ITERATIONS (and PT-MAP's maxiters)
SINKHORN_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------- helpers


def cosine_scores(features: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``(E, N, D)``, ``(E, W, D)`` → ``(E, N, W)`` cosine similarities
    (easyfsl's ``cosine_distance_to_prototypes``)."""
    return torch.bmm(F.normalize(features, dim=-1), F.normalize(centres, dim=-1).transpose(1, 2))


def rectified_prototypes(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                         n_way: int) -> torch.Tensor:
    """BD-CSPN's prototype rectification (easyfsl ``BDCSPN.rectify_prototypes``), batched.

    Queries are shifted by ``mean(support) − mean(query)`` (feature shifting); each class prototype becomes the
    average of its support examples and of the shifted queries predicted in it (argmax cosine to the class
    means), weighted by ``exp(cos(x, μ_c))`` normalised per class (label propagation).

    Shapes: support ``(E, S, D)``, support_labels ``(E, S)``, query ``(E, Q, D)`` → ``(E, W, D)``, W = n_way.
    """
    support_onehot = one_hot(support_labels, n_way, support.dtype)
    prototypes = class_means(support, support_labels, n_way)
    shifted = query + (support.mean(1, keepdim=True) - query.mean(1, keepdim=True))
    support_logits = cosine_scores(support, prototypes).exp()  # (E, S, W)
    query_logits = cosine_scores(shifted, prototypes).exp()  # (E, Q, W)
    query_onehot = one_hot(query_logits.argmax(-1), n_way, query_logits.dtype)
    support_weights = support_onehot * support_logits
    query_weights = query_onehot * query_logits
    total = (support_weights.sum(1) + query_weights.sum(1)).unsqueeze(1)  # (E, 1, W)
    return (torch.bmm((support_weights / total).transpose(1, 2), support)
            + torch.bmm((query_weights / total).transpose(1, 2), shifted))


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision is computed in float32 (exponentials and Sinkhorn underflow in fp16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ------------------------------------------------------------------------------------------- methods


class TransductiveMethod(FewShotMethod):
    """Base class: feature preprocessing (``norm``/``base_mean``) shared by the transductive methods."""

    transductive = True
    default_norm = "none"

    def __init__(self, norm: Optional[str] = None, base_mean: Optional[Array] = None) -> None:
        self.base_mean = None if base_mean is None else _vector(base_mean, "base_mean")
        self.norm = norm or ("cl2n" if self.base_mean is not None else self.default_norm)
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}: use {', '.join(NORMS)}")
        if self.norm == "cl2n" and self.base_mean is None:
            raise ValueError(f"{self.name}: norm='cl2n' needs base_mean (the mean feature of the training split)")
        if self.base_mean is not None and self.norm != "cl2n":
            raise ValueError(f"{self.name}: base_mean is only used with norm='cl2n', not norm={self.norm!r}")

    def prepare(self, support: torch.Tensor, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The features the method works on: ``norm`` applied, half precision promoted to float32."""
        dtype = _working_dtype(support.dtype)
        return (normalise(support.to(dtype), self.norm, self.base_mean),
                normalise(query.to(dtype), self.norm, self.base_mean))

    def scores(self, support, support_labels, query, n_way):
        prepared_support, prepared_query = self.prepare(support, query)
        return self.transductive_scores(prepared_support, support_labels, prepared_query, n_way).to(support.dtype)

    def transductive_scores(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                            n_way: int) -> torch.Tensor:  # pragma: no cover - abstract
        """Scores ``(E, Q, n_way)`` from the prepared features ``(E, S, D)``, ``(E, Q, D)``."""
        raise NotImplementedError


class BDCSPNMethod(TransductiveMethod):
    """BD-CSPN (Liu, Song & Qin, "Prototype Rectification for Few-Shot Learning", ECCV 2020), as easyfsl's
    ``BDCSPN``: prototypes rectified with the queries (``rectified_prototypes``: feature shifting + label
    propagation), score = cosine similarity of the (unshifted) query to the rectified prototypes.

    Options: ``norm``/``base_mean`` only (default ``"none"``: raw features, as easyfsl). easyfsl simplifies the
    paper's rectification, which weights examples by ``exp(ε·cos)`` with a temperature ε and pseudo-labels only
    the most confident queries of each class (top Z): easyfsl (and this) uses ε = 1 and every query's argmax.
    That is easyfsl's algorithm rather than the paper's, so there is no paper value to take over.
    """

    name = "bdcspn"

    def transductive_scores(self, support, support_labels, query, n_way):
        return cosine_scores(query, rectified_prototypes(support, support_labels, query, n_way))

    def describe(self) -> str:
        return f"bdcspn: rectified prototypes, cosine, norm={self.norm}"


class TIMMethod(TransductiveMethod):
    """TIM-GD (Boudiaf et al., "Transductive Information Maximization for Few-Shot Learning", NeurIPS 2020), as
    easyfsl's ``TIM``: prototypes (init: class means) fine-tuned by Adam to minimise
    ``ce_weight·CE(support) − (marginal_weight·H(Ŷ_Q) − conditional_weight·H(Ŷ_Q|X_Q))`` with logits
    ``temperature·cos(x, w_c)``; score = ``cos(q, w_c)`` to the fine-tuned prototypes.

    Defaults (easyfsl's): ``steps=50, lr=1e-4, temperature=10, ce_weight=1.0, marginal_weight=1.0,
    conditional_weight=0.1``, ``norm="none"``. The paper's protocol (official code, github.com/mboudiaf/TIM)
    differs in the classifier itself (logits ``−temperature/2·‖x − w_c‖²`` on L2-normalised features,
    temperature 15, weights (0.1, 1, 0.1), 1000 Adam steps at lr 1e-4), so easyfsl's defaults are kept; its
    step count, learning rate, temperature, weights and ``norm="l2n"`` can be set. Each episode's loss only
    involves its own prototypes, and Adam is elementwise: optimising the sum over episodes updates every episode
    exactly as optimising it alone (as the official TIM code does).
    """

    name = "tim"

    def __init__(self, steps: int = 50, lr: float = 1e-4, temperature: float = 10.0, ce_weight: float = 1.0,
                 marginal_weight: float = 1.0, conditional_weight: float = 0.1, norm: Optional[str] = None,
                 base_mean: Optional[Array] = None) -> None:
        if int(steps) < 0 or float(lr) <= 0 or float(temperature) <= 0:
            raise ValueError(f"tim needs steps >= 0, lr > 0 and temperature > 0, got {steps}, {lr}, {temperature}")
        super().__init__(norm, base_mean)
        self.steps, self.lr, self.temperature = int(steps), float(lr), float(temperature)
        self.weights = (float(ce_weight), float(marginal_weight), float(conditional_weight))

    def transductive_scores(self, support, support_labels, query, n_way):
        # callers may run under torch.inference_mode (evaluate does): leave it, with ordinary copies of the inputs
        with torch.inference_mode(False), torch.enable_grad():
            return self._fine_tuned_scores(support.clone(), support_labels.clone(), query.clone(), n_way)

    def _fine_tuned_scores(self, support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                           n_way: int) -> torch.Tensor:
        onehot = one_hot(support_labels, n_way, support.dtype)
        prototypes = class_means(support, support_labels, n_way).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([prototypes], lr=self.lr)
        ce_weight, marginal_weight, conditional_weight = self.weights
        for _ in range(self.steps):
            support_logits = self.temperature * cosine_scores(support, prototypes)
            query_logits = self.temperature * cosine_scores(query, prototypes)
            cross_entropy = -(onehot * support_logits.log_softmax(-1)).sum(-1).mean(-1)  # (E,)
            probs = query_logits.softmax(-1)
            conditional_entropy = -(probs * torch.log(probs + 1e-12)).sum(-1).mean(-1)
            marginal = probs.mean(1)
            marginal_entropy = -(marginal * torch.log(marginal)).sum(-1)
            loss = ce_weight * cross_entropy - (marginal_weight * marginal_entropy
                                                - conditional_weight * conditional_entropy)
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
        return cosine_scores(query, prototypes.detach())

    def describe(self) -> str:
        ce, marginal, conditional = self.weights
        return (f"tim: {self.steps} Adam steps, lr={self.lr:g}, temperature={self.temperature:g}, "
                f"weights ce={ce:g} H(Y)={marginal:g} H(Y|X)={conditional:g}, norm={self.norm}")


class LaplacianShotMethod(TransductiveMethod):
    """LaplacianShot (Ziko et al., "Laplacian Regularized Few-Shot Learning", ICML 2020), as easyfsl's
    ``LaplacianShot``: BD-CSPN-rectified prototypes, unary terms ``a_qc = ‖q − μ_c‖²``, a kNN affinity ``W``
    between queries (``W_ij = 1`` when j is one of the ``knn − 1`` nearest other queries of i, not symmetrised,
    as the official code), then the bound updates ``Y ← softmax(−a + lam·W·Y)`` for at most ``steps``
    iterations, stopping (from the third) once the bound ``Σ Y log Y + a·Y − lam·(W·Y)·Y`` changes by at most
    1e-6 of its value. Scores are the soft assignments ``Y`` (rows sum to 1).

    Defaults: ``steps=20, knn=3, lam=0.7`` (easyfsl's; the paper tunes ``lam`` on the validation split over
    {0.1 … 1.5}); ``norm``: CL2N with ``base_mean`` and L2N without it (the paper's protocol is CL2N;
    easyfsl's default is raw features, ``norm="none"``). ``knn`` larger than the number of queries is
    clamped to it. The bound test runs per episode (an active mask), in float64 on float32 sums as easyfsl.
    """

    name = "laplacianshot"
    default_norm = "l2n"

    def __init__(self, steps: int = 20, knn: int = 3, lam: float = 0.7, norm: Optional[str] = None,
                 base_mean: Optional[Array] = None) -> None:
        if int(steps) < 0 or int(knn) < 1 or float(lam) < 0:
            raise ValueError(f"laplacianshot needs steps >= 0, knn >= 1 and lam >= 0, got {steps}, {knn}, {lam}")
        super().__init__(norm, base_mean)
        self.steps, self.knn, self.lam = int(steps), int(knn), float(lam)

    def transductive_scores(self, support, support_labels, query, n_way):
        prototypes = rectified_prototypes(support, support_labels, query, n_way)
        unary = torch.cdist(query, prototypes) ** 2  # (E, Q, W)
        return self.bound_updates(unary, self.affinity(query))

    def affinity(self, query: torch.Tensor) -> torch.Tensor:
        """``(E, Q, D)`` → ``(E, Q, Q)``: 1 where column j is among the ``knn − 1`` nearest neighbours of row i."""
        k = min(self.knn, query.shape[1])
        neighbours = torch.cdist(query, query).topk(k, largest=False).indices[..., 1:]  # first: the point itself
        kernel = torch.zeros(query.shape[0], query.shape[1], query.shape[1], dtype=query.dtype, device=query.device)
        return kernel.scatter_(2, neighbours, 1.0)

    def bound_updates(self, unary: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Algorithm 1 of the paper, per-episode early stopping: ``(E, Q, W)``, ``(E, Q, Q)`` → ``(E, Q, W)``."""
        assignments = (-unary).softmax(-1)
        previous = torch.full((unary.shape[0],), float("inf"), dtype=torch.float64, device=unary.device)
        active = torch.ones(unary.shape[0], dtype=torch.bool, device=unary.device)
        for step in range(self.steps):
            updated = (-unary - (-self.lam * torch.bmm(kernel, assignments))).softmax(-1)
            assignments = torch.where(active[:, None, None], updated, assignments)
            bound = self.upper_bound(assignments, unary, kernel)
            converged = (bound - previous).abs() <= 1e-6 * previous.abs() if step > 1 else torch.zeros_like(active)
            active = active & ~converged
            if not bool(active.any()):
                break
            previous = torch.where(active, bound, previous)
        return assignments

    def upper_bound(self, assignments: torch.Tensor, unary: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        """Equation 7 of the paper per episode, ``(E,)`` float64 (summed in the features' dtype, as easyfsl)."""
        pairwise = torch.bmm(kernel, assignments)
        terms = unary * assignments + (-self.lam * pairwise * assignments)
        return (assignments * (assignments + 1e-12).log() + terms).sum((1, 2)).double()

    def describe(self) -> str:
        return f"laplacianshot: {self.steps} bound updates, knn={self.knn}, lambda={self.lam:g}, norm={self.norm}"


class PTMAPMethod(TransductiveMethod):
    """PT-MAP (Hu, Gripon & Pateux, "Leveraging the Feature Distribution in Transfer-based Few-Shot Learning",
    ICANN 2021), as easyfsl's ``PTMAP``: power transform ``(relu(x) + 1e-6)^power``, prototypes (init: class
    means) moved ``steps`` times by ``lr`` towards the mean of support (one-hot) and queries weighted by their
    soft assignments; assignments = Sinkhorn optimal transport of ``exp(−lam·‖q − μ_c‖²)`` with every query
    carrying mass 1 and every class ``Q / n_way`` (balanced queries, as the paper); scores = the final
    transport plan (rows sum to 1). Sinkhorn stops per episode once the row sums move by less than 1e-6
    (at most 1000 iterations), as easyfsl.

    Defaults: ``lr=0.2, lam=10, power=0.5`` (easyfsl = paper); ``steps=20`` (the paper's; easyfsl: 10);
    ``post_norm=True``: the paper's preprocessing after the power transform (unit-normalise, centre the
    support and the queries each on their own mean, unit-normalise again; its QR reduction is a rotation and
    changes no distance), which easyfsl leaves out (``post_norm=False``; without it raw features of large
    norm make ``exp(−lam·d²)`` underflow). ``norm`` (before the power transform): ``"none"``, as both.
    """

    name = "ptmap"

    def __init__(self, steps: int = 20, lr: float = 0.2, lam: float = 10.0, power: float = 0.5,
                 post_norm: bool = True, norm: Optional[str] = None, base_mean: Optional[Array] = None) -> None:
        if int(steps) < 0 or not 0 < float(lr) <= 1 or float(lam) <= 0 or float(power) <= 0:
            raise ValueError(f"ptmap needs steps >= 0, 0 < lr <= 1, lam > 0 and power > 0, got {steps}, {lr}, "
                             f"{lam}, {power}")
        super().__init__(norm, base_mean)
        self.steps, self.lr, self.lam, self.power = int(steps), float(lr), float(lam), float(power)
        self.post_norm = bool(post_norm)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Power transform, then (``post_norm``) unit sphere, centring on this set's mean, unit sphere:
        ``(E, N, D)`` → ``(E, N, D)``."""
        features = (features.relu() + 1e-6).pow(self.power)
        if self.post_norm:
            features = features / features.norm(dim=-1, keepdim=True)
            features = features - features.mean(1, keepdim=True)
            features = features / features.norm(dim=-1, keepdim=True)
        return features

    def transductive_scores(self, support, support_labels, query, n_way):
        support, query = self.transform(support), self.transform(query)
        prototypes = class_means(support, support_labels, n_way)
        support_assignments = one_hot(support_labels, n_way, support.dtype)
        features = torch.cat([support, query], dim=1)
        for _ in range(self.steps):
            assignments = torch.cat([support_assignments, self.transport(query, prototypes)], dim=1)
            estimate = torch.bmm(assignments.transpose(1, 2), features) / assignments.sum(1).unsqueeze(-1)
            prototypes = prototypes + self.lr * (estimate - prototypes)
        return self.transport(query, prototypes)

    def transport(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Sinkhorn-Knopp soft assignments ``(E, Q, W)`` of the queries to the prototypes."""
        cost = torch.cdist(query, prototypes) ** 2
        class_mass = cost.shape[1] / cost.shape[2]
        plan = torch.exp(-self.lam * cost)
        plan = plan / plan.sum((1, 2), keepdim=True)
        active = torch.ones(cost.shape[0], dtype=torch.bool, device=cost.device)
        for _ in range(SINKHORN_MAX_ITERATIONS):
            row_sums = plan.sum(2)
            updated = plan * (1 / (row_sums + 1e-10)).unsqueeze(2)
            updated = updated * (class_mass / (updated.sum(1) + 1e-10)).unsqueeze(1)
            plan = torch.where(active[:, None, None], updated, plan)
            active = active & ~((row_sums - plan.sum(2)).abs().amax(1) < SINKHORN_TOLERANCE)
            if not bool(active.any()):
                break
        return plan

    def describe(self) -> str:
        return (f"ptmap: {self.steps} MAP steps, lr={self.lr:g}, lambda={self.lam:g}, power={self.power:g}, "
                f"post_norm={self.post_norm}, norm={self.norm}")
