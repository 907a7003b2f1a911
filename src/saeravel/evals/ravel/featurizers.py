"""Featurizers beyond masks over latents / neurons and DAS (``ravel.intervene``): PCA, boundless
DAS, multi-task DAS, probe-selected SAE latents and a given basis.

Each is an :class:`~saeravel.evals.ravel.intervene.Intervention`: ``forward(base, source)`` maps the
base's and the source's residual vectors at the entity token to the vector patched in. Facts
taken from the references (code read, not copied):

* PCA (RAVEL ``src/methods/pca.py``; MIB's DBM+PCA): the featurizer is the orthogonal matrix of
  principal components of the site's activations; the features swapped are either selected by
  a learned mask (DBM over the components) or the first ``k``. RAVEL z-scores every dim
  before PCA: ``eval.pca.standardize=true`` does (the swap then happens in z-space and is
  mapped back). The default is centred only, because z-scoring measured the method worse on
  the planted world (equalised block spectra make eigh mix attributes' components: 0.775 vs
  0.945 disentangle on Country, aligned basis, small size).
* Boundless DAS (pyvene ``BoundlessRotatedSpaceIntervention``): a learned rotation and ONE
  learned boundary ``b`` (a fraction of ``d``, clamped to [1e-3, 1], init 0.5); the mask over
  rotated dim ``i`` is a sigmoid of ``(b * d - i) / T`` with ``T`` annealed. pyvene multiplies in
  a second factor ``sigmoid((i - 0) / T)`` (a lower boundary fixed at 0), which caps dim 0's
  weight at 0.5 whatever ``T``; it is dropped here, so the mask is monotone non-increasing in
  ``i`` and its hard form keeps exactly the dims ``i < b * d``. pyvene's recipe adds the
  boundary (the fraction, weight 1) to every step's loss, which keeps the swapped subspace
  small; so does ``eval.boundless.penalty=1.0`` (0 drops it).
* Rotations (DAS, boundless DAS, MDAS): torch's ``orthogonal`` parametrization, as pyvene; the
  map is Cayley by default (``eval.das.orthogonal_map``; pyvene gets torch's default,
  ``matrix_exp``, which the ``paper`` recipe pins): the same set of rotations, several times
  cheaper per step.
* DAS's objective (``eval.das.objective``): RAVEL trains its "MDAS" objective (cause pairs of
  the attribute plus isolation pairs of the others) and offers cause-only DAS as a baseline;
  ``cause_isolation`` (default, what the verdict needs) and ``cause`` are both here. (This
  project's ``mdas`` is a different method: one rotation shared across attributes.)
* MDAS: see :class:`MultiTaskDAS`.
* SAE probe (SAEBench's RAVEL latent selection, ``evals/ravel/uniprobe.py``): a linear probe on
  SAE latents at the entity token (there: an L1 linear SVC telling the target attribute's
  prompts from the others', its coefficient sweep setting how many latents survive). Here:
  see :func:`rank_latents_by_probe`.
* RLAP (RAVEL ``src/methods/linear_adversarial_probe.py``, R-LACE of Ravfogel et al. 2022): a
  relaxed projection ``P`` (symmetric, eigenvalues in [0, 1], trace ``k``: the Fantope) is
  trained adversarially against a linear classifier of the attribute's value on
  ``x (I - P)``, the classifier minimising its cross-entropy, ``P`` maximising it and being
  projected back onto the Fantope after every step; the concept subspace is the top ``k``
  eigenvectors of ``P`` (RAVEL swaps that subspace, the row space of ``W`` in
  ``I - W^T W``). See :func:`rlace_basis` for the differences.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from saeravel.evals.ravel.intervene import (
    FlipTerms,
    Intervention,
    LearnedMask,
    mask_or_first_k,
    orthogonal_linear,
    rotated_flip_terms,
    rotation,
)

# ----------------------------------------------------------------------------- PCA


def principal_components(
    x: torch.Tensor, standardize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions of the rows of ``x`` [n, d]: (components [d, d] as rows, most
    variance first; explained variance [d]). Mean-centred, and with ``standardize`` each dim
    divided by its std first (RAVEL's z-scores; :func:`feature_scale` is that std); signs
    fixed so each component's largest-magnitude entry is positive (deterministic)."""
    x = x.double()
    xc = x - x.mean(0, keepdim=True)
    if standardize:
        xc = xc / feature_scale(x).double()
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    var, vec = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(var, descending=True)
    var, comps = var[order], vec[:, order].T
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * torch.where(sign == 0, torch.ones_like(sign), sign)
    return comps.float(), var.clamp_min(0).float()


def feature_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-dim std of the rows of ``x`` (1 where a dim is constant), as float."""
    sd = x.double().std(0)
    return torch.where(sd > 1e-8, sd, torch.ones_like(sd)).float()


class PCASwap(Intervention):
    """Swap the source's coordinates on principal components: ``b + ((s - b) C^T * m) C`` for
    the top ``n`` components ``C`` [n, d] (fit beforehand on training activations) and either a
    learned mask ``m`` over them (``mode=mask``) or ``m = 1`` on the first ``k`` (``mode=fixed``).
    The components outside the top ``n`` are never swapped."""

    def __init__(
        self, components: torch.Tensor, mode: str = "mask", k: int = 16, init: float = 0.0,
        straight_through: bool = False, scale: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        n = components.shape[0]
        self.register_buffer("components", components.float().clone())
        d = components.shape[1]
        self.register_buffer("scale", (scale if scale is not None else torch.ones(d)).float())
        mask_or_first_k(self, n, mode, k, init, straight_through, "pca")

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # Components of standardised activations (``scale`` = the per-dim std, RAVEL's z-scores;
        # ones when only centred): swap in z-space, map back (the mean cancels in s - b).
        C, sd = self.components.to(b.dtype), self.scale.to(b.dtype)
        m = self.mask() if self.mask is not None else self.fixed
        return b + ((((s - b) / sd) @ C.T) * m) @ C * sd

    def penalty(self) -> torch.Tensor:
        return self.mask().mean() if self.mask is not None else torch.zeros(())

    def flip_terms(self, b: torch.Tensor, s: torch.Tensor) -> FlipTerms | None:
        """Component ``j`` moves the vector by its z-space coordinate of ``s - b`` along
        ``C[j] * sd``."""
        if self.mask is None:
            return None
        C, sd = self.components.to(b.dtype), self.scale.to(b.dtype)
        return ((s - b) / sd) @ C.T, C * sd


# ----------------------------------------------------------------------------- boundless DAS


class BoundaryMask(nn.Module):
    """A mask over ``size`` ordered dims set by one learned boundary ``b`` (a fraction of
    ``size``, clamped to [1e-3, 1]): ``sigmoid((b * size - i) / T)`` while training; hard
    (``i < b * size``) at test time. The interface of :class:`LearnedMask` (``hard``,
    ``temperature``, ``kept``, ``top``, ``param``) so training and scoring treat it alike; not
    refinable (its entries are not free bits)."""

    refinable = False

    def __init__(self, size: int, init: float = 0.5) -> None:
        super().__init__()
        self.size = size
        self.param = nn.Parameter(torch.tensor([float(init)]))
        self.register_buffer("index", torch.arange(size).float())
        self.temperature = 1.0
        self.hard = False
        self.straight_through = False

    def edge(self) -> torch.Tensor:
        return self.param.clamp(1e-3, 1.0)[0] * self.size

    def forward(self) -> torch.Tensor:
        edge = self.edge()
        if self.hard:
            return (self.index < edge).to(self.param.dtype)
        return torch.sigmoid((edge - self.index) / self.temperature)

    def kept(self) -> int:
        return int((self.index < self.edge()).sum())

    def top(self, n: int) -> list[int]:
        return list(range(min(n, self.kept())))


class BoundlessDAS(Intervention):
    """DAS whose swapped subspace is the rotated dims below a learned boundary (pyvene's
    boundless rotated-space intervention; see the module docstring for the one difference).
    The boundary trains at ``boundary_lr`` (pyvene's tutorials: 10x the rotation's)."""

    def __init__(
        self, d_model: int, init: float = 0.5, boundary_lr_scale: float = 10.0,
        orthogonal_map: str = "cayley", penalty: float = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.rot = orthogonal_linear(d_model, orthogonal_map)
        self.mask = BoundaryMask(d_model, init)
        self.boundary_lr_scale = boundary_lr_scale
        self.penalty_weight = penalty  # pyvene's recipe: the boundary (a fraction) added, weight 1

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        R = rotation(self.rot)
        rb, rs = b @ R, s @ R
        return (rb + self.mask() * (rs - rb)) @ R.T

    def penalty(self) -> torch.Tensor:
        return self.mask.param.clamp(1e-3, 1.0).sum()

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        rot = [p for n, p in self.named_parameters() if not n.startswith("mask.")]
        return [{"params": rot, "lr": lr},
                {"params": [self.mask.param], "lr": lr * self.boundary_lr_scale}]  # fmt: skip


# ----------------------------------------------------------------------------- MDAS


class MultiTaskDAS(Intervention):
    """Multi-task DAS: ONE rotation shared by every attribute in ``attributes`` and one learned
    mask over the rotated dims per attribute, trained jointly on all their (cause and isolation)
    training pairs; each pair uses the mask of the attribute it intervenes on. Scored per
    attribute with that attribute's mask (:attr:`active`).

    RAVEL's code (``scripts/train_intervention.py``) calls "multi-task" the training of one
    attribute's intervention on that attribute's cause task plus the other attributes'
    isolation tasks (``match_base``); saeravel's ``das`` already trains on exactly that. This
    method is the further step the name suggests: the featurizer (rotation) is shared across
    the attributes' tasks, only the feature selection (mask) is per attribute. With one
    attribute it IS :class:`~saeravel.evals.ravel.intervene.DAS` (mode=mask): same parameters, created
    in the same order, so the same seed trains the same intervention."""

    def __init__(
        self, d_model: int, attributes: list[str], init: float = 0.0,
        straight_through: bool = False, orthogonal_map: str = "cayley",
    ) -> None:  # fmt: skip
        super().__init__()
        self.rot = orthogonal_linear(d_model, orthogonal_map)
        self.attributes = list(attributes)
        self.masks = nn.ModuleDict(
            {a: LearnedMask(d_model, init, straight_through) for a in self.attributes}
        )
        self.active = self.attributes[0]
        self._rows: list[str] | None = None

    @property
    def mask(self) -> LearnedMask:  # the active attribute's mask (scoring, refinement)
        return self.masks[self.active]

    @mask.setter
    def mask(self, value: Any) -> None:  # Intervention.__init__ assigns None
        if value is not None:
            raise AttributeError("MultiTaskDAS's masks are per attribute")

    def route(self, pairs: list[Any]) -> None:
        """Use each pair's intervened attribute's mask in the next forward call."""
        self._rows = [q.intervened for q in pairs]

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        R = rotation(self.rot)
        rb, rs = b @ R, s @ R
        rows, self._rows = self._rows, None
        if rows is not None and len(rows) == len(b) and len(set(rows)) > 1:
            by_attr = {a: self.masks[a]() for a in set(rows)}
            m = torch.stack([by_attr[a] for a in rows])
        else:
            m = self.masks[rows[0] if rows else self.active]()
        return (rb + m * (rs - rb)) @ R.T

    def penalty(self) -> torch.Tensor:
        return torch.stack([m().mean() for m in self.masks.values()]).mean()

    def flip_terms(self, b: torch.Tensor, s: torch.Tensor) -> FlipTerms:
        """Those of the active attribute's mask (refinement flips it)."""
        return rotated_flip_terms(rotation(self.rot), b, s)

    def set_temperature(self, t: float) -> None:
        for m in self.masks.values():
            m.temperature = t


# ----------------------------------------------------------------------------- SAE latents


class LatentSwap(Intervention):
    """Swap the chosen SAE latents from the source (the rest from the base) and decode, with
    the normalisation of :class:`~saeravel.evals.ravel.intervene.SAEMask`; ``add_error`` adds the
    base's reconstruction error back. No parameters."""

    def __init__(self, sae: Any, latents: list[int], add_error: bool = False) -> None:
        super().__init__()
        self.sae = sae
        self.latents = list(latents)
        m = torch.zeros(sae.d_sae)
        m[self.latents] = 1.0
        self.register_buffer("chosen", m)
        self.add_error = add_error

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        zb, stats = self.sae.normalize(b)
        zs, _ = self.sae.normalize(s)
        fb, fs = self.sae.encode_normalized(zb), self.sae.encode_normalized(zs)
        m = self.chosen.to(fb.dtype)
        out = self.sae.denormalize(self.sae.decode_normalized(fb + m * (fs - fb)), stats)
        if self.add_error:
            out = out + (b - self.sae.reconstruct(b))
        return out


@torch.no_grad()
def sae_latents(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """SAE latents of residual vectors ``x`` (in the SAE's normalised space)."""
    return sae.encode_normalized(sae.normalize(x)[0])


@torch.no_grad()
def sparse_sae_latents(sae: Any, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """:func:`sae_latents` of ``x`` [n, d] as a sparse COO tensor [n, d_sae] on the CPU
    (float32), encoded ``batch_size`` rows at a time: at most one batch is ever dense."""
    parts = []
    for i in range(0, len(x), batch_size):
        parts.append(sae_latents(sae, x[i : i + batch_size]).float().cpu().to_sparse())
    if not parts:
        return torch.zeros(0, sae.d_sae).to_sparse()
    return torch.cat(parts).coalesce()


def rank_latents_by_probe(
    latents: torch.Tensor, labels: list[str], steps: int = 300, lr: float = 0.05,
    l1: float = 0.01, seed: int = 0,
) -> tuple[list[int], dict[str, Any]]:  # fmt: skip
    """Rank SAE latents by a probe trained on them to predict the attribute's value.

    A multinomial logistic regression on the standardised latents [n, d_sae] (latents that are
    constant on the data get zero weight), full batch, Adam, with an L1 penalty so weight
    concentrates on few latents; a latent's score is its largest absolute weight over the
    values. Returns the latents in descending score (only those with a nonzero score) and the
    probe's training accuracy.

    ``latents`` may be dense or sparse (COO, e.g. :func:`sparse_sae_latents`); the standardised
    matrix is never built: with ``a_j = 1 / sd_j`` on live latents (0 elsewhere), the logits
    ``((x - mu) * a) @ w`` are ``x @ (a * w) - (mu * a) @ w``, a sparse product, and the
    column means and stds are sums over the nonzeros (float64, the dense two-pass values).
    Memory: the latents' nonzeros (16 bytes each) plus about ten [d_sae, values] float32
    tensors (weights, Adam's moments, gradients, temporaries): measured 0.60 GB at 128k
    latents x 5000 prompts (top-64 SAE, 158 values; scripts/bench_memory.py), where the dense
    path peaked at 10.0 GB (4.0 GB at 2000 prompts). The result equals the dense
    computation's up to float rounding (the same ranking on the tests' fixtures, but for the
    overfit noise latents' tail, whose order float rounding moves in either path).

    SAEBench's selection differs in its label: it probes "is this prompt one of the target
    attribute's" (target vs a balanced mix of the other attributes' prompts), with an L1 linear
    SVC whose coefficient sweep sets the count. At the entity token of a causal model the
    prompt's attribute is only visible through the words before the entity, so that label
    ranks template detectors, not value carriers (on the planted world it is not learnable at
    all); the value label is RAVEL's own feature-selection classifier's (``select_features``)."""
    gen = torch.Generator().manual_seed(seed)
    values = sorted(set(labels))
    y = torch.tensor([values.index(v) for v in labels])
    x = (latents if latents.is_sparse else latents.to_sparse()).coalesce().float()
    n, d = x.shape
    cols, vals = x.indices()[1], x.values().double()
    mu64 = torch.zeros(d, dtype=torch.float64).index_add_(0, cols, vals) / n
    dev = torch.zeros(d, dtype=torch.float64).index_add_(0, cols, (vals - mu64[cols]) ** 2)
    zeros = n - torch.bincount(cols, minlength=d)  # each column's implicit zeros
    sd = ((dev + zeros * mu64**2) / (n - 1)).sqrt().float()
    live = sd > 1e-8
    a = torch.where(live, 1 / sd.clamp_min(1e-8), torch.zeros_like(sd))
    mu_a = mu64.float() * a
    w = torch.zeros(d, len(values))
    w.normal_(0, 1e-3, generator=gen)
    w.requires_grad_(True)
    bias = torch.zeros(len(values), requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=lr)

    def logits() -> torch.Tensor:
        return torch.sparse.mm(x, a[:, None] * w) - mu_a @ w + bias

    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(logits(), y) + l1 * w.abs().sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((logits().argmax(1) == y).float().mean())
        score = w.abs().max(1).values * live
    order = torch.argsort(score, descending=True)
    ranked = order[score[order] > 0].tolist()
    return ranked, {"probe_train_accuracy": acc, "n_values": len(values), "n_examples": len(labels),
                    "n_live_latents": int(live.sum())}  # fmt: skip


# ----------------------------------------------------------------------------- RLAP


def fantope_projection(P: torch.Tensor, rank: int) -> torch.Tensor:
    """The nearest point of the Fantope {0 <= eig <= 1, trace = rank} to symmetric ``P``: its
    eigenvalues shifted by the ``theta`` (bisection) that makes the clipped ones sum to
    ``rank``, R-LACE's projection."""
    P = 0.5 * (P + P.T)
    lam, U = torch.linalg.eigh(P.double())
    lo, hi = float(lam.min()) - 1.0, float(lam.max())
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if float((lam - mid).clamp(0, 1).sum()) > rank:
            lo = mid
        else:
            hi = mid
    lam_plus = (lam - 0.5 * (lo + hi)).clamp(0, 1)
    return ((U * lam_plus) @ U.T).to(P.dtype)


def rlace_basis(
    x: torch.Tensor, labels: list[str], rank: int, steps: int = 300, lr: float = 0.01,
    clf_steps: int = 5, seed: int = 0, p_lr: float = 1.0,
) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """RLAP's concept subspace [rank, d] (orthonormal rows) for ``labels`` from the vectors
    ``x`` [n, d]: R-LACE's minimax game on the centred vectors, full batch, ``steps`` rounds of
    ``clf_steps`` Adam steps of a multinomial logistic classifier on ``x (I - P)`` then one
    gradient-ascent step on ``P`` and the Fantope projection; the top ``rank`` eigenvectors of
    the final ``P``. Differences from RAVEL's: full-batch Adam for both players instead of
    SGD minibatches, no early stop on the classifier's accuracy nearing the majority class,
    and the final ``P`` is used (not the best of the run by the classifier's loss). ``P`` takes
    plain gradient steps (``p_lr``; RAVEL's too, SGD): Adam's per-entry steps move a d x d
    matrix too far for the Fantope projection to settle."""
    gen = torch.Generator().manual_seed(seed)
    values = sorted(set(labels))
    y = torch.tensor([values.index(v) for v in labels])
    z = x.float() - x.float().mean(0)
    z = z / z.norm(dim=1).mean().clamp_min(1e-8)  # a scale-free step size
    d = z.shape[1]
    P = fantope_projection(torch.randn(d, d, generator=gen) * 1e-2, rank).requires_grad_(True)
    w = (torch.randn(d, len(values), generator=gen) * 1e-2).requires_grad_(True)
    b = torch.zeros(len(values), requires_grad=True)
    opt_clf = torch.optim.Adam([w, b], lr=lr)
    opt_p = torch.optim.SGD([P], lr=p_lr)
    eye = torch.eye(d)
    with torch.enable_grad():
        for _ in range(steps):
            for _ in range(clf_steps):
                opt_clf.zero_grad()
                loss = nn.functional.cross_entropy(z @ (eye - P.detach()) @ w + b, y)
                loss.backward()
                opt_clf.step()
            opt_p.zero_grad()
            adv = -nn.functional.cross_entropy(z @ (eye - P) @ w.detach() + b.detach(), y)
            adv.backward()
            opt_p.step()
            with torch.no_grad():
                P.copy_(fantope_projection(P, rank))
    with torch.no_grad():
        _, U = torch.linalg.eigh(0.5 * (P + P.T).double())
        basis = U[:, -rank:].T.float()
        acc = float(((z @ (eye - basis.T @ basis) @ w + b).argmax(1) == y).float().mean())
    return basis, {"rank": rank, "n_values": len(values), "n_examples": len(labels),
                   "adversary_accuracy_after": acc}  # fmt: skip


# ----------------------------------------------------------------------------- given basis


class ProjectorSwap(Intervention):
    """The one projector swap: ``b + (s - b) P`` for an orthogonal projector ``P`` [d, d]. The
    planted world's oracle passes its block's projector; a given basis (``fixed``) comes
    through :meth:`from_basis`."""

    RTOL = 1e-4

    def __init__(self, projector: torch.Tensor, basis: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("projector", projector.float().clone())
        if basis is not None:
            self.register_buffer("basis", basis.float().clone())
        else:
            self.basis = None

    @classmethod
    def from_basis(cls, basis: torch.Tensor) -> ProjectorSwap:
        """Swap the source's component in the span of ``basis`` [k, d] (rows need not be
        orthonormal): ``P`` is the orthogonal projector onto the row space (``pinv(B) B``).
        Singular values below ``RTOL`` times the largest count as zero (a float32 file holding a
        projector has noise singular values ~1e-7 that an exact pseudo-inverse would blow up
        into extra swapped directions). The identity basis swaps everything; rows ``e_i`` for
        ``i`` in S equal the neuron swap on S."""
        B = basis.double()
        return cls((torch.linalg.pinv(B, rtol=cls.RTOL) @ B).float(), basis)

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return b + (s - b) @ self.projector.to(b.device, b.dtype)

    def rank(self) -> int:
        """The rank of the given basis (of the projector when there is none)."""
        m = self.basis if self.basis is not None else self.projector
        return int(torch.linalg.matrix_rank(m.double(), rtol=self.RTOL))
