"""Interventions (mask over SAE latents, mask over neurons, DAS) and the fast forward.

Every method maps the base's and the source's vectors at the entity's last token (the
activation at the job's site of block ``layer``: the residual after it by default, or what its
MLP or attention adds, ``site=``) to the vector patched into the base run at that site. A mask method's patched vector
is affine in its binarised mask: :meth:`Intervention.flip_terms` gives each entry's rank-1
change, which refinement adds instead of re-running the method per flip. :class:`SAEMask`
also takes its inputs' latents precomputed (:meth:`SAEMask.forward_latents`: the SAE is frozen,
so the job encodes each prompt once).

Fast forward (:class:`SuffixRunner`): the model is frozen, so everything before the entity
is the same at every step. Per prompt template, the keys and values of the tokens before
the entity are computed once for every block after ``layer`` (they are identical for every
entity sharing the template); per base prompt, the residual after ``layer`` of the entity
and the tokens after it is computed once. A training step then runs only those few suffix
positions through the blocks after ``layer`` (attending to the frozen prefix keys/values)
and unembeds only the last position. :func:`naive_logits` is the reference it must equal.

Sites inside block ``layer`` (``mlp_out``, ``attn_out``, ``resid_mid``): a patch there changes
the rest of block ``layer`` at the entity (``attn_out`` feeds the block's MLP), so the runner
keeps the residual *before* block ``layer`` instead and reruns block ``layer`` too, with the
vectors patched at the site's hook point (:func:`resume_block`, :func:`patched`); the prefix's
keys and values are then kept from block ``layer`` on.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from saeravel.evals.ravel.prompts import Prompt, pad
from saeravel.hooks import act_name, hook_site, kv_names, resid_post, resid_pre, site_hook

# ----------------------------------------------------------------------------- rotations

ORTHOGONAL_MAPS = ("cayley", "matrix_exp")


def orthogonal_linear(d_model: int, orthogonal_map: str = "cayley") -> nn.Linear:
    """A bias-free ``d_model x d_model`` linear map kept orthogonal by torch's ``orthogonal``
    parametrization. ``cayley`` (the default) trains the same set of rotations as
    ``matrix_exp`` (torch's default for square weights, and so pyvene's), but its forward and
    backward are linear solves instead of a matrix exponential and its Frechet derivative:
    several times cheaper per optimiser step at d_model=768 (``scripts/bench_rotation.py``
    prints the ratio on your machine)."""
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise ValueError(
            f"unknown orthogonal map {orthogonal_map!r}; valid: {', '.join(ORTHOGONAL_MAPS)}"
        )
    lin = nn.Linear(d_model, d_model, bias=False)
    return nn.utils.parametrizations.orthogonal(lin, orthogonal_map=orthogonal_map)


def rotation(lin: nn.Module) -> torch.Tensor:
    """The orthogonal weight of :func:`orthogonal_linear`'s map. With gradients on (a training
    step) it is computed once per call, as torch does; with gradients off (scoring,
    refinement: many forward calls with unchanged parameters) it is computed once per
    parameter update and reused: the cache is keyed by the parameters' and buffers' in-place
    version counters, so an optimiser step or ``load_state_dict`` invalidates it."""
    if torch.is_grad_enabled():
        return lin.weight
    key = tuple((t.data_ptr(), t._version) for t in (*lin.parameters(), *lin.buffers()))
    cached = lin.__dict__.get("_saeravel_rotation")
    if cached is None or cached[0] != key:
        cached = (key, lin.weight.detach())
        lin.__dict__["_saeravel_rotation"] = cached
    return cached[1]


# ----------------------------------------------------------------------------- methods

Latents = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # (latents, (mean, std))


def temperature(
    step: int, total: int, t_start: float, t_end: float, schedule: str, anneal: float = 1.0
) -> float:
    """Annealed mask temperature: ``linear`` (the paper) or ``log`` (geometric) from
    ``t_start`` to ``t_end`` over the first ``anneal`` fraction of the ``total`` steps, then
    ``t_end``; or ``constant`` (``t_start`` throughout)."""
    frac = min(1.0, step / max(1, round(anneal * total) - 1))
    if schedule == "linear":
        return t_start + (t_end - t_start) * frac
    if schedule == "log":
        return math.exp(math.log(t_start) + (math.log(t_end) - math.log(t_start)) * frac)
    if schedule == "constant":
        return t_start
    raise ValueError(f"unknown temperature schedule {schedule!r}; valid: linear, log, constant")


class LearnedMask(nn.Module):
    """``sigmoid(param / T)`` while training; at test time binarised (``param > 0``, i.e.
    sigmoid > 0.5) unless ``soft`` (the paper kept the soft mask at test time).

    ``straight_through``: the forward pass uses the binarised mask and the backward pass the
    gradient of ``sigmoid(param / T)``, so training optimises the mask that is tested."""

    def __init__(self, size: int, init: float = 0.0, straight_through: bool = False) -> None:
        super().__init__()
        self.param = nn.Parameter(torch.full((size,), float(init)))
        self.temperature = 1.0
        self.hard = False
        self.straight_through = straight_through

    def forward(self) -> torch.Tensor:
        binary = (self.param > 0).to(self.param.dtype)
        if self.hard:
            return binary
        soft = torch.sigmoid(self.param / self.temperature)
        if self.straight_through and self.training:
            return binary + soft - soft.detach()
        return soft

    def top(self, n: int) -> list[int]:
        """Indices of the kept entries, most confident first (at most ``n``)."""
        kept = torch.nonzero(self.param > 0).flatten()
        order = torch.argsort(self.param[kept], descending=True)
        return kept[order][:n].tolist()

    def kept(self) -> int:
        return int((self.param > 0).sum())


def mask_or_first_k(
    module: nn.Module, n: int, mode: str, k: int, init: float, straight_through: bool, what: str
) -> None:
    """Give ``module`` (over ``n`` dims) a learned mask (``mode=mask``: ``module.mask``) or the
    first ``k`` dims (``mode=fixed``: the buffer ``module.fixed``); ``what`` names the config
    group in errors."""
    module.mode = mode
    if mode == "mask":
        module.mask = LearnedMask(n, init, straight_through)
    elif mode == "fixed":
        if not 0 < k <= n:
            raise ValueError(f"{what}.k={k} must be in 1..{n}")
        module.register_buffer("fixed", (torch.arange(n) < k).float())
    else:
        raise ValueError(f"unknown {what}.mode {mode!r}; valid: mask, fixed")


FlipTerms = tuple[torch.Tensor, torch.Tensor]  # (coef [n, m], dirs [m, d])


class Intervention(nn.Module):
    """Base class: ``forward(base, source) -> patched`` on [batch, d_model] vectors."""

    # Weight of :meth:`penalty` in the training loss; None: the recipe's ``eval.mask.l1``.
    penalty_weight: float | None = None
    # Whether :meth:`forward_latents` takes cached SAE latents of the inputs (a frozen SAE's
    # encodings, made once per prompt by the job's ``LatentBank``) instead of re-encoding them.
    uses_latents: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.mask: LearnedMask | None = None

    def penalty(self) -> torch.Tensor:
        return torch.zeros(())

    def own_state(self) -> dict[str, torch.Tensor]:
        """The method's own parameters and buffers (not those of a frozen SAE it wraps), copied:
        later changes (refinement flips mask entries in place) do not reach them."""
        return {
            k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("sae.")
        }

    def flip_terms(self, b: torch.Tensor, s: torch.Tensor) -> FlipTerms | None:
        """The patched vector is affine in the binarised mask: turning entry ``j`` on adds
        ``coef[:, j, None] * dirs[j]`` to each row (turning it off subtracts it). Returns
        ``(coef [n, m], dirs [m, d])`` for inputs [n, d], or None when the method has no such
        form (refinement then re-runs the method per flip)."""
        return None


class NeuronMask(Intervention):
    """Swap the masked residual dimensions from the source."""

    def __init__(self, d_model: int, init: float = 0.0, straight_through: bool = False) -> None:
        super().__init__()
        self.mask = LearnedMask(d_model, init, straight_through)

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        m = self.mask()
        return b + m * (s - b)

    def penalty(self) -> torch.Tensor:
        return self.mask().mean()

    def flip_terms(self, b: torch.Tensor, s: torch.Tensor) -> FlipTerms:
        """Entry ``j`` moves dim ``j`` by ``s_j - b_j``."""
        return s - b, torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)


class SAEMask(Intervention):
    """Mix base and source SAE latents with a learned mask and decode. Each input is
    normalised with its own statistics; the result is mapped back with the base's.
    ``add_error`` adds the base's reconstruction error back."""

    uses_latents = True

    def __init__(
        self, sae: Any, init: float = 0.0, add_error: bool = False, straight_through: bool = False
    ) -> None:
        super().__init__()
        self.sae = sae
        self.mask = LearnedMask(sae.d_sae, init, straight_through)
        self.add_error = add_error

    def encode(self, x: torch.Tensor) -> Latents:
        """What the mix needs of one input: its latents and its normalisation statistics."""
        z, stats = self.sae.normalize(x)
        return self.sae.encode_normalized(z), stats

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.forward_latents(b, self.encode(b), self.encode(s))

    def forward_latents(self, b: torch.Tensor, enc_b: Latents, enc_s: Latents) -> torch.Tensor:
        """:meth:`forward` with the inputs' :meth:`encode` given (cached: the SAE is frozen)."""
        (fb, stats), (fs, _) = enc_b, enc_s
        m = self.mask()
        out = self.sae.denormalize(self.sae.decode_normalized(fb + m * (fs - fb)), stats)
        if self.add_error:
            out = out + (b - self.sae.reconstruct(b))
        return out

    def penalty(self) -> torch.Tensor:
        return self.mask().mean()

    def flip_terms(self, b: torch.Tensor, s: torch.Tensor) -> FlipTerms | None:
        """Latent ``j`` moves the decoded vector by ``(fs_j - fb_j) W_dec[j]`` in normalised
        space, times the base's std in model space. None for an SAE without a linear decoder
        (``W_dec``), e.g. a custom one."""
        W_dec = getattr(self.sae, "W_dec", None)
        if not isinstance(W_dec, torch.Tensor):
            return None
        (fb, (_, std)), (fs, _) = self.encode(b), self.encode(s)
        return (fs - fb) * std, W_dec.to(b.dtype)


class DAS(Intervention):
    """Distributed alignment search: an orthogonal rotation R; the source's rotated
    coordinates replace the base's on a learned mask (``mode=mask``, the paper's variant) or
    on the first ``k`` (``mode=fixed``, RAVEL's)."""

    def __init__(
        self, d_model: int, mode: str = "mask", k: int = 16, init: float = 0.0,
        straight_through: bool = False, orthogonal_map: str = "cayley",
    ) -> None:  # fmt: skip
        super().__init__()
        self.rot = orthogonal_linear(d_model, orthogonal_map)
        mask_or_first_k(self, d_model, mode, k, init, straight_through, "das")

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        R = rotation(self.rot)  # orthogonal [d, d]
        rb, rs = b @ R, s @ R
        m = self.mask() if self.mask is not None else self.fixed
        return (rb + m * (rs - rb)) @ R.T

    def penalty(self) -> torch.Tensor:
        return self.mask().mean() if self.mask is not None else torch.zeros(())

    def flip_terms(self, b: torch.Tensor, s: torch.Tensor) -> FlipTerms | None:
        return rotated_flip_terms(rotation(self.rot), b, s) if self.mask is not None else None


def rotated_flip_terms(R: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> FlipTerms:
    """Flip terms of a swap in the rotated coordinates ``x @ R``: rotated dim ``j`` moves the
    vector by ``(s - b) R[:, j]`` along ``R[:, j]`` (the rotation fixed: computed once)."""
    return (s - b) @ R, R.T


class FixedIntervention(Intervention):
    """Parameter-free references: ``none`` (base), ``swap`` (source), ``sae_recon`` (the
    base's SAE reconstruction: the cost of dropping the SAE error), ``sae_swap`` (all source
    latents decoded with the base's normalisation). (The oracle of a planted world is
    ``featurizers.ProjectorSwap``.)"""

    def __init__(self, kind: str, sae: Any = None) -> None:
        super().__init__()
        self.kind = kind
        self.sae = sae

    def forward(self, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return b
        if self.kind == "swap":
            return s
        zb, stats = self.sae.normalize(b)
        if self.kind == "sae_recon":
            return self.sae.denormalize(
                self.sae.decode_normalized(self.sae.encode_normalized(zb)), stats
            )
        zs, _ = self.sae.normalize(s)
        return self.sae.denormalize(
            self.sae.decode_normalized(self.sae.encode_normalized(zs)), stats
        )


# ----------------------------------------------------------------------------- forward passes


def _pad_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    return (tok.pad_token_id or 0) if tok is not None else 0


def job_site(ctx: Any) -> str:
    """The job's site (``resid_post``, ``mlp_out``, ...), read from its hook
    (``EvalContext.hook_name``, which the pipeline builds from ``layer`` and ``site``; a
    context without one, e.g. a test's stand-in: ``resid_post``)."""
    hook = getattr(ctx, "hook_name", None)
    if hook is None:
        return "resid_post"
    found = hook_site(hook)
    if found is None or found[0] != ctx.layer:
        raise ValueError(f"RAVEL: hook {ctx.hook_name} is not a site of layer {ctx.layer}")
    return found[1]


def resume_block(layer: int, site: str) -> int:
    """The first block a patch at ``site`` of block ``layer`` changes: the next one after the
    residual (``resid_post``), block ``layer`` itself for a site inside it."""
    return layer + 1 if site == "resid_post" else layer


def resume_input(layer: int, site: str) -> str:
    """The hook whose value enters block :func:`resume_block` (what the fast paths cache):
    the residual after block ``layer`` (``resid_post``), else the residual before it."""
    return resid_post(layer) if site == "resid_post" else resid_pre(layer)


@contextlib.contextmanager
def patched(
    model: Any, hook: str, rows: torch.Tensor, pos: torch.Tensor, vectors: torch.Tensor
) -> Iterator[None]:
    """While inside: the hook point ``hook`` of ``model`` outputs ``vectors`` at ``(rows,
    pos)`` (differentiable in ``vectors``), through a torch forward hook on that one module
    (transformer_lens' own hooks, permanent ones included, are left as they are)."""

    def patch(module: Any, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        at = (rows.to(out.device), pos.to(out.device))
        return out.index_put(at, vectors.to(device=out.device, dtype=out.dtype))

    handle = model.hook_dict[hook].register_forward_hook(patch)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def resid_at(
    model: Any, prompts: list[Prompt], layer: int, batch_size: int = 64,
    site: str = "resid_post", hook: str | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Per prompt, the activation at ``site`` of block ``layer`` (by default the residual after
    it; ``hook``: that hook point instead) at every position (unpadded)."""
    out: list[torch.Tensor] = []
    dev = model.cfg.device
    name = hook or site_hook(site, layer)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        toks, _ = pad(chunk, _pad_id(model), dev)
        _, cache = model.run_with_cache(toks, names_filter=name, stop_at_layer=layer + 1)
        r = cache[name]
        out.extend(r[j, : len(p.tokens)].clone() for j, p in enumerate(chunk))
    return out


def _last_positions(last: list[int], n_last: list[int] | None) -> tuple[list[int], list[int]]:
    """(row, position) of each prompt's last ``n_last[i]`` positions (1 each when None)."""
    rows, pos = [], []
    for i, end in enumerate(last):
        k = 1 if n_last is None else n_last[i]
        rows += [i] * k
        pos += list(range(end - k + 1, end + 1))
    return rows, pos


def naive_logits(
    model: Any, bases: list[Prompt], vectors: torch.Tensor, layer: int,
    n_last: list[int] | None = None, site: str = "resid_post",
) -> torch.Tensor:  # fmt: skip
    """Reference: the full model on the base prompts with ``vectors`` patched in at each
    entity's last token at ``site`` of block ``layer`` (a transformer_lens hook there);
    logits at each prompt's last token [batch, vocab] (with ``n_last``: at each prompt's last
    ``n_last[i]`` positions, stacked in order)."""
    toks, last = pad(bases, _pad_id(model), model.cfg.device)
    pos = torch.tensor([p.entity_pos for p in bases], device=toks.device)
    rows = torch.arange(len(bases), device=toks.device)

    def patch(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        resid = resid.clone()
        resid[rows, pos] = vectors.to(resid.dtype)
        return resid

    logits = model.run_with_hooks(toks, fwd_hooks=[(site_hook(site, layer), patch)])
    if n_last is None:
        return logits[rows, last]
    r, q = _last_positions(last.tolist(), n_last)
    return logits[torch.tensor(r, device=toks.device), torch.tensor(q, device=toks.device)]


_W_U_T: dict[int, tuple[Any, int, torch.Tensor]] = {}  # id(W_U) -> (weakref, version, W_U.T)


def unembed(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``model.unembed(x)`` (the same ``F.linear`` on the same layout) without its copy of
    ``W_U.T`` on every call (GPT-2: 154 MB, ~20% of a suffix step); the transposed copy is
    kept per weight and remade when the weight changes."""
    W = model.unembed.W_U
    hit = _W_U_T.get(id(W))
    if hit is None or hit[0]() is not W or hit[1] != W._version:
        for k in [k for k, v in _W_U_T.items() if v[0]() is None]:
            del _W_U_T[k]  # weights that no longer exist
        hit = (weakref.ref(W), W._version, W.detach().T.contiguous())
        _W_U_T[id(W)] = hit
    return F.linear(x, hit[2], model.unembed.b_U)


def logits_at(model: Any, last: torch.Tensor) -> torch.Tensor:
    """Logits from the final residual at given positions [rows, d]: final norm, unembedding
    and the output soft-cap, as ``HookedTransformer.forward``."""
    x = last[:, None]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = unembed(model, x)[:, 0]
    cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
    if cap is not None and cap > 0:  # Gemma-2: 30
        logits = cap * torch.tanh(logits / cap)
    return logits


class SuffixRunner:
    """Caches the frozen parts of the base runs and recomputes only what an intervention
    changes (see module docstring)."""

    def __init__(
        self, model: Any, layer: int, batch_size: int = 64, site: str = "resid_post"
    ) -> None:
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        self._entry_cls = TransformerLensKeyValueCacheEntry
        self.model = model
        self.layer = layer
        self.site = str(site)
        self.hook = site_hook(self.site, layer)
        self.start = resume_block(layer, self.site)  # the first block a step runs
        self.batch_size = batch_size
        self.prefix_kv: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # id(prompt) -> (prompt, residual entering block `start`, from entity_start); the
        # prompt is kept so that a dead prompt's id, reused by a new one, is recognised as
        # another prompt
        self._suffix: dict[int, tuple[Prompt, torch.Tensor]] = {}

    @torch.no_grad()
    def prepare(self, prompts: list[Prompt]) -> None:
        """Cache prefix keys/values per template and suffix residuals per prompt."""
        model, L = self.model, self.layer
        later = range(self.start, model.cfg.n_layers)
        names = kv_names(later)
        for prefix in {p.prefix for p in prompts} - set(self.prefix_kv):
            if not prefix or not names:
                self.prefix_kv[prefix] = []
                continue
            toks = torch.tensor([prefix], device=model.cfg.device)
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
            self.prefix_kv[prefix] = [
                (cache[act_name("k", i)], cache[act_name("v", i)]) for i in later
            ]
        todo = list({id(p): p for p in prompts if not self.prepared(p)}.values())
        entering = resid_at(model, todo, L, self.batch_size, hook=resume_input(L, self.site))
        for p, r in zip(todo, entering, strict=True):
            self._suffix[id(p)] = (p, r[p.entity_start :])

    def prepared(self, p: Prompt) -> bool:
        return self._suffix.get(id(p), (None,))[0] is p

    def suffix(self, p: Prompt) -> torch.Tensor:
        """The residual entering block ``start`` (after ``layer`` at ``resid_post``) of
        ``p``'s entity and later tokens (prepared)."""
        if not self.prepared(p):
            raise KeyError("SuffixRunner: prompt not prepared (call prepare first)")
        return self._suffix[id(p)][1]

    def logits(
        self, bases: list[Prompt], vectors: torch.Tensor, n_last: list[int] | None = None
    ) -> torch.Tensor:
        """Logits at each base's last token with ``vectors`` patched in (with ``n_last``: at
        its last ``n_last[i]`` positions, stacked in order, as :func:`naive_logits`); all
        ``bases`` must share one prefix (group batches with :func:`batches_by_prefix`)."""
        model = self.model
        prefix = bases[0].prefix
        if any(p.prefix != prefix for p in bases):
            raise ValueError("SuffixRunner.logits needs bases that share a prefix")
        n = len(bases)
        width = max(len(p.tokens) - p.entity_start for p in bases)
        dtype = self.suffix(bases[0]).dtype  # the model's (bfloat16: vectors are float32)
        resid = torch.zeros(n, width, model.cfg.d_model, device=vectors.device, dtype=dtype)
        for i, p in enumerate(bases):
            s = self.suffix(p)
            resid[i, : len(s)] = s
        rows = torch.arange(n, device=vectors.device)
        ent = torch.tensor([p.entity_pos - p.entity_start for p in bases], device=vectors.device)
        patch = contextlib.nullcontext()  # while block `start` runs
        if self.start == self.layer:  # a site inside block `layer`
            patch = patched(model, self.hook, rows, ent, vectors)
        else:
            resid = resid.index_put((rows, ent), vectors.to(dtype))
        kv = self.prefix_kv[prefix]
        for j, block in enumerate(model.blocks[self.start :]):
            entry = None
            if kv:
                k, v = kv[j]
                entry = self._entry_cls(
                    k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), frozen=True
                )
            with patch if j == 0 else contextlib.nullcontext():
                resid = block(resid, past_kv_cache_entry=entry)
        r, q = _last_positions([len(p.tokens) - 1 - p.entity_start for p in bases], n_last)
        picked = resid[
            torch.tensor(r, device=vectors.device), torch.tensor(q, device=vectors.device)
        ]
        return logits_at(model, picked)


def batches_by_prefix(items: list[Any], key: Any, batch_size: int, rng: Any) -> list[list[Any]]:
    """Shuffle ``items`` into batches whose members share ``key(item)``; batch order shuffled."""
    groups: dict[Any, list[Any]] = defaultdict(list)
    for it in items:
        groups[key(it)].append(it)
    batches = []
    for g in groups.values():
        g = list(g)
        rng.shuffle(g)
        batches.extend(g[i : i + batch_size] for i in range(0, len(g), batch_size))
    rng.shuffle(batches)
    return batches
