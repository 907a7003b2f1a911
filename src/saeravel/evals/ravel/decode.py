"""Greedy decoding with a patched entity through key/value caches (RAVEL's scoring).

The reference (:func:`naive_generate`) runs the whole patched model once per generated token.
:class:`CachedDecoder` computes, once per prompt template, the keys and values of the tokens
before the entity in every block, and once per base prompt the clean keys and values of the
entity and later tokens in blocks ``0..layer`` (the patch after block ``layer`` cannot change
them) and their residual after ``layer``. A call then runs only the entity and later tokens
through the blocks after ``layer`` (with the vector patched in), reads the first token, and
decodes each further token by one position through every block, appending to the caches
(transformer_lens' ``TransformerLensKeyValueCacheEntry``; the blocks apply rotary positions
and attention soft-caps themselves, the output soft-cap is applied here as in
``HookedTransformer.forward``).

No padding: a batch holds prompts of one template and one length, so every row has the same
positions and no attention mask is needed. (Right-padding would put the generated tokens
after pad slots the cache cannot mask; transformer_lens' left-padding path derives its mask
from pad-token ids, which on GPT-2 equal the BOS id.)

Several interventions of one batch of bases (``vector_sets``) are stacked along the batch and
decoded in one pass; the clean prefix and suffix caches are shared by all of them.

Memory: a pass holds as many bases as fit in ``eval.decode_mem_gb`` (``mem_gb``) by
:meth:`CachedDecoder.pass_bytes`, an upper bound on what the pass allocates (every row's keys
and values over the prompt and generated tokens in every block, the prefix's included, since
transformer_lens' cache concatenates it per row; the logits; the clean forward of its bases).
The clean suffix caches are computed per pass and dropped after it, so nothing grows with the
number of bases scored; only one row of prefix keys/values per template is kept. The passes
change which rows share a batch, not what any row computes: the generations equal those of
one pass over every prompt (tested with a budget of one base against a large one). A budget
too small for one base is a one-line error (``main.validate`` refuses one below a lower bound
of any row from the model's config before the model loads).

A site inside block ``layer`` (``site=mlp_out``, ``attn_out``, ``resid_mid``; see
:mod:`saeravel.evals.ravel.intervene`): the clean caches stop before block ``layer`` (its keys
and values are computed from the residual before it, which the patch cannot change, but the
block is rerun with the vectors patched at the site's hook point, appending them itself).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any

import torch

from saeravel.errors import UserError
from saeravel.evals.ravel.intervene import (
    _pad_id,
    logits_at,
    naive_logits,
    patched,
    resume_block,
    resume_input,
)
from saeravel.evals.ravel.prompts import Prompt, pad
from saeravel.hooks import act_name, kv_names, site_hook

KV = tuple[torch.Tensor, torch.Tensor]


@torch.no_grad()
def naive_generate(
    model: Any, prompts: list[Prompt], n_tokens: int, layer: int | None = None,
    vectors: torch.Tensor | None = None, batch_size: int = 64, site: str = "resid_post",
) -> list[list[int]]:  # fmt: skip
    """Reference: greedy continuation of ``n_tokens`` per prompt by one full (patched) forward
    per token, optionally with ``vectors`` patched in at ``site`` of block ``layer`` (by
    default the residual after it) at each entity."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        vec = vectors[i : i + batch_size] if vectors is not None else None
        cur = [
            Prompt(p.template, p.entity, p.attribute, list(p.tokens), p.entity_start, p.entity_pos)
            for p in chunk
        ]
        new: list[list[int]] = [[] for _ in chunk]
        for _ in range(n_tokens):
            if vec is None:
                toks, last = pad(cur, _pad_id(model), model.cfg.device)
                logits = model(toks)[torch.arange(len(cur)), last]
            else:
                logits = naive_logits(model, cur, vec, layer, site=site)
            for j, t in enumerate(logits.argmax(-1).tolist()):
                cur[j].tokens.append(t)
                new[j].append(t)
        out.extend(new)
    return out


class CachedDecoder:
    """Greedy decoding after the entity patch at ``site`` of block ``layer``, through cached
    keys/values (see the module docstring); equals :func:`naive_generate` token for token.
    A decoding pass holds as many bases as :meth:`pass_bytes` says fit in ``mem_gb`` GB
    (``eval.decode_mem_gb``); the clean caches are built for a pass's bases and dropped after
    it (only the per-template prefix caches are kept)."""

    def __init__(self, model: Any, layer: int, mem_gb: float, site: str = "resid_post") -> None:
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        self._entry = TransformerLensKeyValueCacheEntry
        self.model = model
        self.layer = layer
        self.site = str(site)
        self.hook = site_hook(self.site, layer)
        self.start = resume_block(layer, self.site)  # the first block the patch changes
        self.mem_bytes = float(mem_gb) * 1e9  # what one decoding pass may hold
        self.prefix_kv: dict[tuple[int, ...], list[KV]] = {}  # every block, [1, pos, h, d]
        self.peak_rows = 0  # the most rows (bases x vector sets) one pass held so far

    def pass_bytes(self, bases: int, sets: int, prefix: int, length: int, n_tokens: int) -> int:
        """An upper bound on the bytes a pass of ``bases`` prompts of ``length`` tokens (the
        entity starting at ``prefix``) times ``sets`` vector sets holds while decoding
        ``n_tokens``. Per row (one base, one set): the keys and values of every block over the
        prompt and the generated tokens (the prefix's included: transformer_lens' cache
        concatenates it per row), one block's copy of them while an append or a grouped-query
        repeat makes a new tensor, the suffix's attention scores and activations, the logits;
        per base: its clean keys/values of blocks ``0..start-1`` and, while they are computed,
        that forward's cached keys/values and activations over the whole prompt. Fixed: the
        template's prefix keys/values (one row)."""
        cfg = self.model.cfg
        elem = torch.empty((), dtype=cfg.dtype).element_size()
        heads = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        kv = 2 * heads * cfg.d_head * elem  # one position's key and value in one block
        d, d_mlp = cfg.d_model, getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
        suffix, total = length - prefix, length + n_tokens
        L, S = cfg.n_layers, self.start
        act = 4 * d + 2 * d_mlp  # residual, norms, MLP in and out, per position
        row = (
            (L + 2 + 2 * cfg.n_heads / heads) * total * kv  # the cache, one append, GQA repeat
            + 2 * cfg.n_heads * suffix * total * 4  # attention scores and pattern (fp32 bound)
            + suffix * act * elem
            + 2 * cfg.d_vocab * 4  # logits (and the soft-cap's copy)
        )
        prep = S * length * kv + length * act * elem + 2 * cfg.n_heads * length * length * 4
        clean = S * suffix * kv + suffix * d * elem
        return int(bases * (sets * row + clean + prep) + L * prefix * kv)

    def pass_size(self, sets: int, prefix: int, length: int, n_tokens: int) -> int:
        """The most bases one pass holds within the budget (:meth:`pass_bytes`); a budget too
        small for one base is a one-line :class:`~saeravel.errors.UserError`."""
        one = self.pass_bytes(1, sets, prefix, length, n_tokens)
        fixed = self.pass_bytes(0, sets, prefix, length, n_tokens)
        if one > self.mem_bytes:
            raise UserError(
                f"eval.decode_mem_gb={self.mem_bytes / 1e9:g} is too small for one decoding "
                f"row: a prompt of {length} tokens with {sets} vector set(s) and {n_tokens} "
                f"generated tokens needs {one / 1e9:.4g} GB"
            )
        return max(1, int((self.mem_bytes - fixed) // (one - fixed)))

    def _prefix(self, prefix: tuple[int, ...]) -> list[KV]:
        """The keys/values of a template's tokens before the entity in every block (cached)."""
        if prefix not in self.prefix_kv:
            model = self.model
            names = set(kv_names(range(model.cfg.n_layers)))
            kv: list[KV] = []
            if prefix:
                toks = torch.tensor([prefix], device=model.cfg.device)
                _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
                kv = [
                    (cache[act_name("k", i)], cache[act_name("v", i)])
                    for i in range(model.cfg.n_layers)
                ]
            self.prefix_kv[prefix] = kv
        return self.prefix_kv[prefix]

    @torch.no_grad()
    def _clean(self, bases: list[Prompt]) -> tuple[list[KV], torch.Tensor]:
        """The clean keys/values of blocks ``0..start-1`` ([n, s, h, d] each) and the residual
        entering block ``start`` ([n, s, d]) of ``bases`` (one template, one length), from the
        entity on: one forward up to block ``layer``, dropped with the pass."""
        model, S = self.model, self.start
        entering = resume_input(self.layer, self.site)
        low = set(kv_names(range(S))) | {entering}
        toks = torch.tensor([p.tokens for p in bases], device=model.cfg.device)
        _, cache = model.run_with_cache(
            toks, names_filter=lambda n: n in low, stop_at_layer=self.layer + 1
        )
        sl = slice(bases[0].entity_start, len(bases[0].tokens))
        kv = [
            (cache[act_name("k", b)][:, sl].clone(), cache[act_name("v", b)][:, sl].clone())
            for b in range(S)
        ]
        return kv, cache[entering][:, sl].clone()

    @torch.no_grad()
    def generate(
        self, prompts: list[Prompt], n_tokens: int, vector_sets: list[torch.Tensor | None]
    ) -> list[list[list[int]]]:
        """Per vector set (``None``: no patch), the greedy continuation of ``n_tokens`` per
        prompt with that set's vectors patched in at each entity; sets are decoded together,
        in passes of one template and one length sized by the memory budget."""
        out: list[list[list[int] | None]] = [[None] * len(prompts) for _ in vector_sets]
        groups: dict[tuple[tuple[int, ...], int], list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            groups[(p.prefix, len(p.tokens))].append(i)
        sets = len(vector_sets)
        for (prefix, length), idx in groups.items():
            per = self.pass_size(sets, len(prefix), length, n_tokens)
            for k in range(0, len(idx), per):
                rows = idx[k : k + per]
                gens = self._decode([prompts[i] for i in rows], n_tokens,
                                    [None if v is None else v[rows] for v in vector_sets])  # fmt: skip
                for s, g in enumerate(gens):
                    for i, toks in zip(rows, g, strict=True):
                        out[s][i] = toks
        return out  # type: ignore[return-value]

    def _decode(
        self, bases: list[Prompt], n_tokens: int, vector_sets: list[torch.Tensor | None]
    ) -> list[list[list[int]]]:
        """One group (one prefix, one length), all vector sets stacked along the batch."""
        model, S = self.model, self.start
        dev = model.cfg.device
        n, sets = len(bases), len(vector_sets)
        self.peak_rows = max(self.peak_rows, n * sets)
        kv_low, resid0 = self._clean(bases)  # [n, s, h, d] per block, [n, s, d]
        ent = torch.tensor([p.entity_pos - p.entity_start for p in bases])
        inside = S == self.layer  # the site is inside block `layer`: patched while it runs
        given = [(i, v) for i, v in enumerate(vector_sets) if v is not None]
        patch = contextlib.nullcontext()  # while block S runs
        if inside:
            resid = resid0.repeat(sets, 1, 1)  # [sets * n, s, d]
            if given:  # the rows of each set with vectors, at its entity
                at_rows = torch.cat([torch.arange(i * n, (i + 1) * n) for i, _ in given])
                at_vecs = torch.cat([v for _, v in given])
                patch = patched(model, self.hook, at_rows, ent.repeat(len(given)), at_vecs)
        else:
            with_patch = []
            for v in vector_sets:
                r = resid0.clone()
                if v is not None:
                    r[torch.arange(n), ent] = v.to(device=r.device, dtype=r.dtype)
                with_patch.append(r)
            resid = torch.cat(with_patch)  # [sets * n, s, d]
        rows = sets * n
        prefix = self._prefix(bases[0].prefix)

        def entry(b: int, suffix: KV | None) -> Any:
            parts_k, parts_v = [], []
            if prefix:
                parts_k.append(prefix[b][0].expand(rows, -1, -1, -1))
                parts_v.append(prefix[b][1].expand(rows, -1, -1, -1))
            if suffix is not None:
                parts_k.append(suffix[0])
                parts_v.append(suffix[1])
            if not parts_k:
                return self._entry.init_cache_entry(model.cfg, dev, rows)
            return self._entry(torch.cat(parts_k, 1), torch.cat(parts_v, 1))

        entries = []
        for b in range(S):  # clean: the same for every vector set
            entries.append(entry(b, (kv_low[b][0].repeat(sets, 1, 1, 1),
                                     kv_low[b][1].repeat(sets, 1, 1, 1))))  # fmt: skip
        del kv_low  # the entries hold their own copies
        for b in range(S, model.cfg.n_layers):  # the patched suffix appends itself
            e = entry(b, None)
            with patch if b == S else contextlib.nullcontext():
                resid = model.blocks[b](resid, past_kv_cache_entry=e)
            entries.append(e)
        pos = len(bases[0].tokens)
        nxt = self._next(resid[:, -1])
        new = [nxt]
        for _ in range(n_tokens - 1):
            toks = nxt[:, None]
            embed = model.hook_embed(model.embed(toks))
            x, short = model.get_residual(
                embed, pos, tokens=toks, return_shortformer_pos_embed=True
            )
            for b, block in enumerate(model.blocks):
                x = block(x, past_kv_cache_entry=entries[b], shortformer_pos_embed=short)
            pos += 1
            nxt = self._next(x[:, -1])
            new.append(nxt)
        gen = torch.stack(new, 1).view(sets, n, n_tokens).tolist()
        return gen

    def _next(self, last: torch.Tensor) -> torch.Tensor:
        """Greedy next token from the final residual at the last position [rows, d]."""
        return logits_at(self.model, last).argmax(-1)
