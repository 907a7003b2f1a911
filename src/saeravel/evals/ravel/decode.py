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
    keys/values (see the module docstring); equals :func:`naive_generate` token for token."""

    def __init__(
        self, model: Any, layer: int, batch_size: int = 64, rows: int = 256,
        site: str = "resid_post",
    ) -> None:  # fmt: skip
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        self._entry = TransformerLensKeyValueCacheEntry
        self.model = model
        self.layer = layer
        self.site = str(site)
        self.hook = site_hook(self.site, layer)
        self.start = resume_block(layer, self.site)  # the first block the patch changes
        self.batch_size = batch_size  # prompts per forward when preparing
        self.rows = rows  # rows per decoding pass (bases x vector sets)
        self.prefix_kv: dict[tuple[int, ...], list[KV]] = {}  # every block, [1, pos, h, d]
        # id(prompt) -> (prompt, clean kv of blocks 0..start-1, the residual entering block
        # start), from the entity on
        self.clean: dict[int, tuple[Prompt, list[KV], torch.Tensor]] = {}

    def _kv_names(self, blocks: range) -> list[str]:
        return kv_names(blocks)

    @torch.no_grad()
    def prepare(self, prompts: list[Prompt]) -> None:
        """Cache the prefix keys/values per template and the clean suffix part per prompt."""
        model, L = self.model, self.layer
        names = set(self._kv_names(range(model.cfg.n_layers)))
        for prefix in {p.prefix for p in prompts} - set(self.prefix_kv):
            if not prefix:
                self.prefix_kv[prefix] = []
                continue
            toks = torch.tensor([prefix], device=model.cfg.device)
            _, cache = model.run_with_cache(toks, names_filter=lambda n: n in names)
            self.prefix_kv[prefix] = [
                (cache[act_name("k", i)], cache[act_name("v", i)])
                for i in range(model.cfg.n_layers)
            ]
        todo = list(
            {id(p): p for p in prompts if self.clean.get(id(p), (None,))[0] is not p}.values()
        )
        S, entering = self.start, resume_input(L, self.site)
        low = set(self._kv_names(range(S))) | {entering}
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            toks, _ = pad(chunk, _pad_id(model), model.cfg.device)
            _, cache = model.run_with_cache(
                toks, names_filter=lambda n: n in low, stop_at_layer=L + 1
            )
            for j, p in enumerate(chunk):
                sl = slice(p.entity_start, len(p.tokens))
                kv = [
                    (cache[act_name("k", b)][j, sl].clone(),
                     cache[act_name("v", b)][j, sl].clone())
                    for b in range(S)
                ]  # fmt: skip
                self.clean[id(p)] = (p, kv, cache[entering][j, sl].clone())

    @torch.no_grad()
    def generate(
        self, prompts: list[Prompt], n_tokens: int, vector_sets: list[torch.Tensor | None]
    ) -> list[list[list[int]]]:
        """Per vector set (``None``: no patch), the greedy continuation of ``n_tokens`` per
        prompt with that set's vectors patched in at each entity; sets are decoded together."""
        self.prepare(prompts)
        out: list[list[list[int] | None]] = [[None] * len(prompts) for _ in vector_sets]
        groups: dict[tuple[tuple[int, ...], int], list[int]] = defaultdict(list)
        for i, p in enumerate(prompts):
            groups[(p.prefix, len(p.tokens))].append(i)
        per = max(1, self.rows // max(1, len(vector_sets)))
        for idx in groups.values():
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
        kv_low = [self.clean[id(p)][1] for p in bases]
        resid0 = torch.stack([self.clean[id(p)][2] for p in bases])  # [n, s, d]
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
        prefix = self.prefix_kv[bases[0].prefix]

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
            k = torch.stack([kv[b][0] for kv in kv_low]).repeat(sets, 1, 1, 1)
            v = torch.stack([kv[b][1] for kv in kv_low]).repeat(sets, 1, 1, 1)
            entries.append(entry(b, (k, v)))
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
