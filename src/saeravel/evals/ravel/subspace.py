"""Subspace recovery on a planted world: what a fitted method swaps, against the block the
world plants the attribute in, by principal angles.

A score says whether the answers moved; this says where the method intervened. For every
featurizer, :func:`swapped_basis` gives orthonormal rows spanning the directions it swaps at
test time (the mask binarised as scored):

* methods of the form ``b + (s - b) P`` (neurons, DAS, PCA, boundless DAS, multi-task DAS, a
  fixed basis, RLAP, the oracle) by linearisation: ``P``'s rows are
  ``method(0, e_i) - method(0, 0)``, checked to be linear (a method that is not, e.g. one that
  normalises its inputs, gets no entry rather than a wrong one);
* SAE latents (the SAE mask, ``sae_probe``) by the decoder rows of the kept latents: the SAE
  encodes nonlinearly, so this is the span the swap can write into, not a projector.

:func:`recovery` compares that span ``S`` (``k`` dims) with the planted block ``B`` (``n``
dims): the cosines of the principal angles are the singular values of ``S B``;
``captured = sum cos^2 / n`` is the share of the block the method swaps (1: all of it, what
cause needs), ``spill = 1 - sum cos^2 / k`` the share of what it swaps that lies outside the
block (other facts' directions, what isolation pays for), ``max_angle_deg`` the largest
principal angle (90 when ``k < n``: some block direction is not swapped at all), and
``into_blocks`` the share of the swapped span inside each other planted block (another
attribute's block costs isolation; the identity block is read by nothing). Under
superposition Country and Continent share one block, so their rows compare with that block.

Differences from the references: RAVEL and the planted-world literature grade methods by their
scores only; atom recovery (:meth:`saeravel.planted.PlantedTruth.atom_recovery`) grades an SAE's
dictionary, and this grades every method's fitted subspace the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from saeravel.evals.ravel.intervene import Intervention

RANK_RTOL = 1e-3  # singular values below this share of the largest span no direction
LINEAR_ATOL = 1e-3  # method(0, 2 e_i) - method(0, 0) must be twice method(0, e_i) - method(0, 0)


def _row_space(rows: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning ``rows``' row space."""
    if rows.numel() == 0:
        return rows.new_zeros((0, rows.shape[-1]))
    _, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    keep = s > RANK_RTOL * s.max().clamp_min(1e-12)
    return vh[keep].float()


def _kept_latents(method: Intervention) -> torch.Tensor | None:
    chosen = getattr(method, "chosen", None)
    if isinstance(chosen, torch.Tensor):
        return chosen > 0
    if method.mask is not None and hasattr(method.mask, "param"):
        return method.mask.param.detach() > 0
    return None


@torch.no_grad()
def swapped_basis(method: Intervention, d_model: int, hard: bool = True) -> torch.Tensor | None:
    """Orthonormal rows [k, d_model] spanning what ``method`` swaps (see the module doc), or
    None when it is neither linear in ``s - b`` nor an SAE with a linear decoder."""
    sae = getattr(method, "sae", None)
    if sae is not None:
        kept, W_dec = _kept_latents(method), getattr(sae, "W_dec", None)
        if kept is None or not isinstance(W_dec, torch.Tensor):
            return None
        return _row_space(W_dec.detach().float().cpu()[kept.cpu()])
    param = next(iter(method.parameters()), None)
    buf = next(iter(method.buffers()), None)
    ref = param if param is not None else buf
    device = ref.device if ref is not None else torch.device("cpu")
    was_hard = getattr(method.mask, "hard", None) if method.mask is not None else None
    if method.mask is not None:
        method.mask.hard = hard
    try:
        zero = torch.zeros(d_model, d_model, device=device)
        eye = torch.eye(d_model, device=device)
        base = method(zero, zero)
        rows = method(zero, eye) - base
        twice = method(zero, 2 * eye) - base
    finally:
        if method.mask is not None:
            method.mask.hard = was_hard
    if not torch.allclose(twice, 2 * rows, atol=LINEAR_ATOL):
        return None
    return _row_space(rows.float().cpu())


def recovery(swapped: torch.Tensor, block: torch.Tensor) -> dict[str, Any]:
    """Principal-angle summary of ``swapped`` (orthonormal rows [k, d]) against ``block``
    (orthonormal columns [d, n]): dims, captured, spill, max angle and the angles."""
    k, n = int(swapped.shape[0]), int(block.shape[1])
    if k == 0:
        return {"dims": 0, "block_dims": n, "captured": 0.0, "spill": None,
                "max_angle_deg": 90.0, "angles_deg": []}  # fmt: skip
    cos = torch.linalg.svdvals(swapped.double() @ block.double()).clamp(0, 1)
    cos2 = float((cos**2).sum())
    angles = [math.degrees(math.acos(float(c))) for c in cos]
    return {
        "dims": k,
        "block_dims": n,
        "captured": round(cos2 / n, 4),
        "spill": round(1 - cos2 / k, 4),
        "max_angle_deg": round(90.0 if k < n else max(angles), 2),
        "angles_deg": [round(a, 2) for a in sorted(angles)[:8]],
    }


def subspace_recovery(
    method: Intervention, truth: Any, attr: str, hard: bool = True
) -> dict[str, Any]:
    """:func:`recovery` of ``method``'s swapped span against ``truth``'s block of ``attr``
    (``{"skipped": why}`` when the span is not defined for the method)."""
    basis = swapped_basis(method, truth.d_model, hard)
    if basis is None:
        return {"skipped": "the method is neither a linear swap nor SAE latents with a decoder"}
    out = recovery(basis, truth.block_basis(attr).float())
    out["block"] = own = truth.block_of(attr)
    if len(basis):  # where the rest of the swap lands: other facts' blocks cost isolation
        out["into_blocks"] = {
            name: round(float(((basis.double() @ truth.block_basis(name).double()) ** 2).sum())
                        / len(basis), 4)
            for name in truth.blocks if name != own
        }  # fmt: skip
    return out
