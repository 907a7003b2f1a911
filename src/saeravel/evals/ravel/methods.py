"""The featurizer registry: every RAVEL method is one :class:`Featurizer` in
:data:`FEATURIZERS`, declaring its basis (:data:`BASES`), its selection (:data:`SELECTIONS`),
what it needs (an SAE, training) and how it is fitted and scored on one attribute.

Its name is a member of ``config.RavelMethod`` (the schema's list, checked against this
registry when the module loads); ``eval.method=all`` runs the registry in that order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from saeravel.checkpoint import entry_name
from saeravel.errors import UserError
from saeravel.evals.ravel.config import RavelMethod, chosen_methods, mdas_attributes, method_names
from saeravel.evals.ravel.featurizers import (
    BoundlessDAS,
    LatentSwap,
    MultiTaskDAS,
    PCASwap,
    ProjectorSwap,
    rank_latents_by_probe,
    rlace_basis,
    sparse_sae_latents,
)
from saeravel.evals.ravel.intervene import (
    DAS,
    FixedIntervention,
    Intervention,
    NeuronMask,
    SAEMask,
    job_site,
)
from saeravel.evals.ravel.pairs import RavelJob
from saeravel.evals.ravel.prompts import Pair
from saeravel.evals.ravel.score import score_fitted
from saeravel.evals.ravel.train import _rates, first_token_eval, train_method

log = logging.getLogger(__name__)

BASES = ("identity", "sae", "rotation", "pca", "given", "probe")  # the space a featurizer swaps in
SELECTIONS = ("learned_mask", "first_k", "boundary", "fixed_set")  # which of its dims it swaps


class Featurizer:
    """One RAVEL method. Subclasses set :attr:`name`, :attr:`basis`, :attr:`selections` (what
    ``eval.<method>`` options may choose) and :attr:`trained`, and implement
    :meth:`fit_and_score` (trained ones: :meth:`build`, see :class:`TrainedFeaturizer`)."""

    name: ClassVar[str]
    basis: ClassVar[str]
    selections: ClassVar[tuple[str, ...]]
    trained: ClassVar[bool] = False

    def sae_need(self, cfg: Any) -> str | None:
        """What of this method needs an SAE under ``cfg`` (for the error), or None."""
        return None

    def runs_on(self, cfg: Any, attr: str) -> bool:
        """Whether the method is scored on attribute ``attr``."""
        return True

    def early(self, cfg: Any, ctx: Any) -> Any:
        """Checks and loading before any data is built; the value goes to ``job.shared[name]``."""
        return None

    def fit_and_score(self, job: RavelJob, attr: str) -> dict[str, Any]:
        """Fit on the training pairs and score on test: ``{"score", "curve", "state"}`` (kept in
        the checkpoint store as ``scored-<name>-<attr>``), or ``{"skipped": why}``."""
        raise NotImplementedError

    def remember(self, job: RavelJob, attr: str, done: dict[str, Any]) -> None:
        """Keep what a later featurizer of this job uses (also for a result from the store)."""


FEATURIZERS: dict[str, Featurizer] = {}


def featurizer(cls: type[Featurizer]) -> type[Featurizer]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.basis not in BASES or not set(cls.selections) <= set(SELECTIONS):
        raise ValueError(f"featurizer {cls.name}: basis {cls.basis}, selections {cls.selections}")
    FEATURIZERS[cls.name] = cls()
    return cls


def _save(job: RavelJob, name: str, attr: str, done: dict[str, Any]) -> dict[str, Any]:
    job.store.save(entry_name("scored", name, attr), done)
    return done


class TrainedFeaturizer(Featurizer):
    """A featurizer with parameters trained by the recipe: :meth:`build` makes it fresh, then
    train, score on test, the train split's score, convergence and the refined mask's score."""

    trained = True

    def build(self, job: RavelJob) -> Intervention:
        raise NotImplementedError

    def live(self, job: RavelJob, method: Intervention) -> Callable[[list[Pair]], list[int]] | None:
        """The mask entries refinement may flip (None: all)."""
        return None

    def extra(self, job: RavelJob, method: Intervention) -> dict[str, Any]:
        """Method-specific result keys."""
        return {}

    def train_pairs(self, job: RavelJob, attr: str) -> list[Pair]:
        """The pairs the method trains on (default: every training pair of ``attr``)."""
        return job.pairs[attr]["train"]

    def fit_and_score(self, job: RavelJob, attr: str) -> dict[str, Any]:
        torch.manual_seed(job.ctx.seed)
        method = self.build(job).to(job.ctx.device)
        train_name = entry_name("train", self.name, attr) if job.store.enabled else None
        desc = f"{self.name}/{attr}"
        curve = train_method(job, method, self.train_pairs(job, attr), desc, train_name)
        r, state = score_fitted(job, method, attr, curve, desc, self.live(job, method))
        r.update(self.extra(job, method))
        done = _save(job, self.name, attr, {"score": r, "curve": curve, "state": state})
        if train_name is not None:
            job.store.remove(train_name)
        return done


def _ste(cfg: Any) -> bool:
    return cfg.mask.estimator == "straight_through"


@featurizer
class SAEMaskFeaturizer(TrainedFeaturizer):
    """``sae``: a learned mask over the SAE's latents."""

    name, basis, selections = RavelMethod.sae.value, "sae", ("learned_mask",)

    def sae_need(self, cfg: Any) -> str | None:
        return self.name

    def build(self, job: RavelJob) -> Intervention:
        cfg, sae = job.cfg, job.ctx.sae
        if sae is None:
            raise UserError(
                "eval.method=sae needs an SAE; choose sae=<family> (sae=none has no latents)"
            )
        return SAEMask(sae, cfg.mask.init, cfg.add_error, _ste(cfg))

    def live(self, job: RavelJob, method: Intervention) -> Callable[[list[Pair]], list[int]]:
        def active(subset: list[Pair]) -> list[int]:  # a latent never active cannot matter
            vecs = torch.cat(
                [job.bank([q.base for q in subset]), job.bank([q.source for q in subset])]
            )
            acts = method.sae.encode_normalized(method.sae.normalize(vecs)[0])
            return torch.nonzero((acts != 0).any(0)).flatten().tolist()

        return active


@featurizer
class NeuronFeaturizer(TrainedFeaturizer):
    """``neurons``: a learned mask over the residual dimensions."""

    name, basis, selections = RavelMethod.neurons.value, "identity", ("learned_mask",)

    def build(self, job: RavelJob) -> Intervention:
        return NeuronMask(job.ctx.model.d_model, job.cfg.mask.init, _ste(job.cfg))


@featurizer
class DASFeaturizer(TrainedFeaturizer):
    """``das``: a learned rotation; a learned mask over its dims or the first k (eval.das)."""

    name, basis, selections = RavelMethod.das.value, "rotation", ("learned_mask", "first_k")

    def build(self, job: RavelJob) -> Intervention:
        cfg = job.cfg
        return DAS(job.ctx.model.d_model, cfg.das.mode, cfg.das.k, cfg.mask.init, _ste(cfg),
                   str(cfg.das.orthogonal_map))  # fmt: skip

    def train_pairs(self, job: RavelJob, attr: str) -> list[Pair]:
        pairs = job.pairs[attr]["train"]
        if job.cfg.das.objective == "cause":  # RAVEL's cause-only DAS
            return [q for q in pairs if q.kind == "cause"]
        return pairs


@featurizer
class PCAFeaturizer(TrainedFeaturizer):
    """``pca``: principal components of the training activations; a learned mask over the top
    components or the first k (eval.pca)."""

    name, basis, selections = RavelMethod.pca.value, "pca", ("learned_mask", "first_k")

    def build(self, job: RavelJob) -> Intervention:
        cfg, d = job.cfg, job.ctx.model.d_model
        z = bool(cfg.pca.standardize)
        comps, _ = job.fit.components(z)
        n = min(cfg.pca.components or d, d)
        if cfg.pca.mode == "fixed" and cfg.pca.k > n:
            raise UserError(f"eval.pca.k={cfg.pca.k} exceeds the {n} principal components")
        return PCASwap(comps[:n], cfg.pca.mode, cfg.pca.k, cfg.mask.init, _ste(cfg),
                       job.fit.scale() if z else None)  # fmt: skip

    def extra(self, job: RavelJob, method: Intervention) -> dict[str, Any]:
        _, var = job.fit.components(bool(job.cfg.pca.standardize))
        n = method.components.shape[0]
        return {"pca": {"mode": str(job.cfg.pca.mode), "components": n,
                        "standardize": bool(job.cfg.pca.standardize),
                        "explained_variance": float(var[:n].sum() / var.sum().clamp_min(1e-12))}}  # fmt: skip


@featurizer
class BoundlessDASFeaturizer(TrainedFeaturizer):
    """``boundless_das``: a learned rotation and one learned boundary (eval.boundless)."""

    name, basis, selections = RavelMethod.boundless_das.value, "rotation", ("boundary",)

    def build(self, job: RavelJob) -> Intervention:
        b = job.cfg.boundless
        return BoundlessDAS(job.ctx.model.d_model, b.init, b.boundary_lr_scale,
                            str(job.cfg.das.orthogonal_map), b.penalty)  # fmt: skip

    def extra(self, job: RavelJob, method: Intervention) -> dict[str, Any]:
        return {"boundary": float(method.mask.param.detach().clamp(1e-3, 1.0))}


@featurizer
class MDASFeaturizer(TrainedFeaturizer):
    """``mdas``: one rotation shared by eval.mdas.attributes, trained jointly on all their
    training pairs (checkpointed as ``train-mdas-joint``, kept as ``fitted-mdas-joint``), a
    learned mask per attribute; scored per attribute with its mask."""

    name, basis, selections = RavelMethod.mdas.value, "rotation", ("learned_mask",)

    def runs_on(self, cfg: Any, attr: str) -> bool:
        return attr in mdas_attributes(cfg)

    def build(self, job: RavelJob) -> Intervention:
        cfg = job.cfg
        return MultiTaskDAS(job.ctx.model.d_model, mdas_attributes(cfg), cfg.mask.init, _ste(cfg),
                            str(cfg.das.orthogonal_map))  # fmt: skip

    def fit_joint(self, job: RavelJob) -> dict[str, Any]:
        if self.name in job.shared:
            return job.shared[self.name]
        fitted = entry_name("fitted", self.name, "joint")
        saved = job.store.load(fitted)
        if saved is not None:
            log.info("mdas: trained before the interruption")
            job.shared[self.name] = saved
            return saved
        torch.manual_seed(job.ctx.seed)
        method = self.build(job).to(job.ctx.device)
        joint = [q for a in mdas_attributes(job.cfg) for q in job.pairs[a]["train"]]
        train_name = entry_name("train", self.name, "joint") if job.store.enabled else None
        curve = train_method(job, method, joint, "mdas/joint", train_name)
        done = {"state": method.own_state(), "curve": curve}
        job.store.save(fitted, done)
        if train_name is not None:
            job.store.remove(train_name)
        job.shared[self.name] = done
        return done

    def fit_and_score(self, job: RavelJob, attr: str) -> dict[str, Any]:
        fitted = self.fit_joint(job)
        method = self.build(job).to(job.ctx.device)
        method.load_state_dict(fitted["state"], strict=False)
        method.active = attr
        curve = list(fitted["curve"])
        r, state = score_fitted(job, method, attr, curve, f"mdas/{attr}")
        r["mdas"] = {"attributes": mdas_attributes(job.cfg), "trained_on": "joint"}
        return _save(job, self.name, attr, {"score": r, "curve": curve, "state": state})


def probe_selection(job: RavelJob, attr: str) -> dict[str, Any]:
    """``sae_probe``'s selection: SAE latents of every training prompt (sparse, from the job's
    ``LatentBank``: never a dense [prompts, d_sae] matrix) ranked by a value probe
    (:func:`~saeravel.evals.ravel.featurizers.rank_latents_by_probe`), then for each count in
    ``eval.sae_probe.counts`` (capped at the ranked latents) the top latents swapped on the
    validation pairs (the training pairs when there are none), first-token rule; the best
    disentangle wins (ties: fewer latents). With ``eval.sae_probe.refine_counts`` the gaps of
    the grid beside the best count are bisected until they close, so any count up to the
    largest one (e.g. 40 between 32 and 48) can win. The test split's first-token curve is reported
    beside, never used."""
    cfg, ctx, pairs = job.cfg, job.ctx, job.pairs[attr]
    sae = ctx.sae
    if job.latents is not None:  # sparse, and shared with the SAE mask's training
        lat = job.latents.sparse(job.fit.prompts)
    else:
        lat = sparse_sae_latents(sae, job.fit.vectors.to(ctx.device))
    labels = [job.world.entities[p.entity][attr] for p in job.fit.prompts]
    p = cfg.sae_probe
    ranked, info = rank_latents_by_probe(lat, labels, p.steps, p.lr, p.l1, ctx.seed)
    counts = sorted({min(c, len(ranked)) for c in p.counts})
    split = "val" if pairs.get("val") else "train"
    rows: list[dict[str, Any]] = []

    def try_count(n: int) -> None:
        m = LatentSwap(sae, ranked[:n], cfg.add_error)
        ce, ok = first_token_eval(job, m, pairs[split])
        _, ok_test = first_token_eval(job, m, pairs["test"])
        rows.append({"count": n, "ce_first_token": ce, **_rates(ok, pairs[split]),
                     "test": _rates(ok_test, pairs["test"])})  # fmt: skip

    def score_of(r: dict[str, Any]) -> float:  # held-out isolation counts where scored
        return r.get("disentangle_all", r["disentangle"])

    def best_row() -> dict[str, Any]:
        return max(rows, key=lambda r: (score_of(r), -r["count"]))

    for n in counts:
        try_count(n)
    best = best_row()
    while p.refine_counts:  # bisect the gaps beside the best count: any count up to the cap
        tried = sorted(r["count"] for r in rows)
        i = tried.index(best["count"])
        gaps = [(tried[i - 1], tried[i])] if i > 0 else []
        gaps += [(tried[i], tried[i + 1])] if i + 1 < len(tried) else []
        mids = [(a + b) // 2 for a, b in gaps if b - a > 1]
        if not mids:
            break
        for n in mids:
            try_count(n)
            if score_of(rows[-1]) > score_of(best):  # strictly better only: a tie
                best = rows[-1]  # on validation (a value it lacks) keeps the grid's count
    rows.sort(key=lambda r: r["count"])
    log.info("sae_probe/%s: best count %d of %s on %s (%s %.3f)", attr, best["count"],
             [r["count"] for r in rows], split,
             "disentangle_all" if "disentangle_all" in best else "disentangle", score_of(best))  # fmt: skip
    return {"latents": ranked[: best["count"]], "best_count": best["count"], "split": split,
            "rule": "first_token", "curve": rows, "ranked_top": ranked[: cfg.report_top_latents],
            **info}  # fmt: skip


@featurizer
class SAEProbeFeaturizer(Featurizer):
    """``sae_probe``: SAE latents ranked by a value probe, the best count on validation swapped
    (eval.sae_probe); no training."""

    name, basis, selections = RavelMethod.sae_probe.value, "sae", ("fixed_set",)

    def sae_need(self, cfg: Any) -> str | None:
        return self.name

    def early(self, cfg: Any, ctx: Any) -> Any:
        if ctx.sae is None:
            raise UserError("eval.method=sae_probe needs an SAE; choose sae=<family>")

    def fit_and_score(self, job: RavelJob, attr: str) -> dict[str, Any]:
        sel = probe_selection(job, attr)
        sae = job.ctx.sae
        method = LatentSwap(sae, sel["latents"], job.cfg.add_error)
        r, state = score_fitted(job, method, attr, [], f"sae_probe/{attr}")
        r["selection"] = sel
        r["mask_kept"], r["mask_size"] = len(sel["latents"]), sae.d_sae
        r["kept_top"] = sel["latents"][: job.cfg.report_top_latents]
        return _save(job, self.name, attr, {"score": r, "curve": [], "state": state})

    def remember(self, job: RavelJob, attr: str, done: dict[str, Any]) -> None:
        job.shared.setdefault("sae_probe_latents", {})[attr] = list(
            done["score"]["selection"]["latents"]
        )


@featurizer
class FixedFeaturizer(Featurizer):
    """``fixed``: a given basis swapped through its projector (eval.fixed): the basis file, else
    the SAE decoder directions of eval.fixed.latents, else of the latents ``sae_probe`` picks
    for the attribute (its selection is run when ``sae_probe`` itself is not)."""

    name, basis, selections = RavelMethod.fixed.value, "given", ("fixed_set",)

    def sae_need(self, cfg: Any) -> str | None:
        if cfg.fixed.basis_file:
            return None
        return "fixed (SAE decoder directions: no eval.fixed.basis_file)"

    def early(self, cfg: Any, ctx: Any) -> Any:
        if cfg.fixed.basis_file:  # its shape needs d_model: first thing
            return load_basis(cfg.fixed.basis_file, ctx.model.d_model)
        return None

    def basis_for(self, job: RavelJob, attr: str) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """The basis for ``attr`` and where it came from (None: skipped, with the reason)."""
        cfg, sae = job.cfg, job.ctx.sae
        given = job.shared.get(self.name)
        if given is not None:
            return given, {"from": "basis_file", "path": cfg.fixed.basis_file}
        if sae is None:
            return None, {"skipped": "no eval.fixed.basis_file and no SAE to take directions from"}
        if cfg.fixed.latents is not None:
            latents, origin = list(cfg.fixed.latents), "latents"
        else:
            latents = job.shared.get("sae_probe_latents", {}).get(attr)
            if latents is None:
                latents = probe_selection(job, attr)["latents"]
            origin = "sae_probe"
        if not latents:
            return None, {"skipped": "sae_probe selected no latents"}
        return decoder_directions(sae, latents), {"from": origin, "latents": latents}

    def fit_and_score(self, job: RavelJob, attr: str) -> dict[str, Any]:
        basis, source = self.basis_for(job, attr)
        if basis is None:
            return {"skipped": source["skipped"]}
        method = ProjectorSwap.from_basis(basis).to(job.ctx.device)
        r, state = score_fitted(job, method, attr, [], f"fixed/{attr}")
        r["basis"] = {**source, "k": int(basis.shape[0]), "rank": method.rank()}
        return _save(job, self.name, attr, {"score": r, "curve": [], "state": state})


@featurizer
class RLAPFeaturizer(Featurizer):
    """``rlap``: RAVEL's linear adversarial probe baseline (R-LACE, Ravfogel et al. 2022; RAVEL
    ``src/methods/linear_adversarial_probe.py``): the subspace an adversarially trained
    projection removes so that no linear probe reads the attribute's value, fit on the training
    vectors, swapped through its projector (eval.rlap); no interchange training."""

    name, basis, selections = RavelMethod.rlap.value, "probe", ("first_k",)

    def fit_and_score(self, job: RavelJob, attr: str) -> dict[str, Any]:
        cfg, fit = job.cfg, job.fit
        labels = [job.world.entities[p.entity][attr] for p in fit.prompts]
        n_values = len(set(labels))
        if n_values < 2:
            return {"skipped": f"one value of {attr} among the training prompts"}
        d = fit.vectors.shape[1]
        rank = min(cfg.rlap.rank or n_values - 1, d - 1)
        basis, info = rlace_basis(fit.vectors.float().cpu(), labels, rank, cfg.rlap.steps,
                                  cfg.rlap.lr, seed=job.ctx.seed)  # fmt: skip
        method = ProjectorSwap.from_basis(basis).to(job.ctx.device)
        r, state = score_fitted(job, method, attr, [], f"rlap/{attr}")
        r["rlap"] = info
        return _save(job, self.name, attr, {"score": r, "curve": [], "state": state})


def load_basis(path: str, d_model: int) -> torch.Tensor:
    """``eval.fixed.basis_file``: a torch tensor [k, d_model] (one-line error otherwise)."""
    try:
        basis = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (any unreadable file is the user's to fix)
        raise UserError(f"eval.fixed.basis_file={path} is not a torch tensor file ({exc})") from exc
    if not isinstance(basis, torch.Tensor) or basis.ndim != 2 or basis.shape[1] != d_model:
        shape = tuple(basis.shape) if isinstance(basis, torch.Tensor) else type(basis).__name__
        raise UserError(
            f"eval.fixed.basis_file={path} holds {shape}; it must be a tensor [k, d_model] "
            f"with d_model={d_model}"
        )
    if not 1 <= basis.shape[0] <= d_model or not torch.isfinite(basis).all():
        raise UserError(
            f"eval.fixed.basis_file={path}: k={basis.shape[0]} rows must be in 1..{d_model}, finite"
        )
    return basis.float()


def decoder_directions(sae: Any, latents: list[int]) -> torch.Tensor:
    """The SAE's decoder directions of ``latents`` [k, d_in]: ``decode(e_j) - decode(0)`` in
    the SAE's (normalised) space; under per-input normalisation that is the direction up to
    each input's scale, so the span the swap uses is the same."""
    bad = [j for j in latents if not 0 <= j < sae.d_sae]
    if bad:
        raise UserError(f"eval.fixed.latents has {bad} outside the SAE's 0..{sae.d_sae - 1}")
    dev = next((t.device for t in sae.parameters()), torch.device("cpu"))
    eye = torch.zeros(len(latents) + 1, sae.d_sae, device=dev)
    eye[torch.arange(1, len(latents) + 1), torch.tensor(latents, dtype=torch.long)] = 1.0
    with torch.no_grad():
        dec = sae.decode_normalized(eye)
    return (dec[1:] - dec[:1]).float().cpu()


if list(FEATURIZERS) != method_names():  # the schema's names and the registry are one list
    raise ImportError(f"RavelMethod {method_names()} != featurizers {list(FEATURIZERS)}")

TRAINED = tuple(n for n, f in FEATURIZERS.items() if f.trained)


def needs_sae(cfg: Any) -> bool:
    """Whether the chosen methods use the SAE (``fixed`` only without a basis file)."""
    return any(FEATURIZERS[m].sae_need(cfg) for m in chosen_methods(cfg))


def check_sae(cfg: Any, sae_family: str | None) -> None:
    """With ``sae=none``, a one-line error naming the chosen methods that need an SAE."""
    if sae_family != "none":
        return
    need = [n for m in chosen_methods(cfg) if (n := FEATURIZERS[m].sae_need(cfg))]
    if need:
        methods = [m for m in method_names() if not FEATURIZERS[m].sae_need(cfg)]
        raise UserError(
            f"eval.method={cfg.method} runs {', '.join(need)}, which need an SAE; choose "
            f"sae=<family>, or a method without one ({', '.join(methods)}"
            + (")" if cfg.fixed.basis_file else ", fixed with eval.fixed.basis_file)")
        )


def references(job: RavelJob, attr: str) -> list[tuple[str, Intervention]]:
    """The parameter-free references scored beside the methods: ``none``, ``swap``; with an
    SAE ``sae_recon``, ``sae_swap``; on a planted world ``oracle`` (its block's projector, in
    the residual stream: at ``site=resid_post`` only)."""
    sae, truth = job.ctx.sae, getattr(job.ctx.model, "truth", None)
    refs: list[tuple[str, Intervention]] = [
        (k, FixedIntervention(k, sae)) for k in ("none", "swap")
    ]
    if sae is not None:
        refs += [(k, FixedIntervention(k, sae)) for k in ("sae_recon", "sae_swap")]
    if truth is not None and job_site(job.ctx) == "resid_post":
        refs.append(("oracle", ProjectorSwap(truth.projector(attr))))
    return refs
