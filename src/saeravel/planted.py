"""``model=planted-city-lm`` and ``sae=planted``: a world whose ground truth is known.

The model is built analytically (no training). Entities have nonce names (a few of two
tokens: a shared generic prefix, then a unique last token) and three attributes drawn
independently per entity (Country, Continent, Language; with ``nesting`` > 0 a fraction of
the entities has its Continent a fixed function of its Country). At the RAVEL site, the
residual after block ``layer`` at the entity's last token, the representation is

    h(e) = m + R c(e),   c(e) = [onehot(Country) ; onehot(Continent) ; onehot(Language) ; z_e]

scaled by ``value_scale``: one-hot value codes per attribute block (``codes=dense``: each
value a dense unit vector of its block instead, a random orthonormal code, so every value uses
every dim; the onehot() above then reads C_A[value]), ``z_e`` a low-dimensional
random identity code (``id_dims``; it is read by nothing, so it cannot be used to memorise
entities), ``m`` the entity-marker direction, the one part identical for every entity, kept
OUTSIDE the rotated subspace. ``R`` is the identity except on the planted subspace (the
blocks), where it is ``Q``: ``aligned`` (Q = I, each neuron is one value of one attribute),
``rotated`` (a random orthogonal Q), ``mixed`` (45-degree rotations of pairs of dims of
different attributes; when one block is larger than all others together, its leftover dims
pair among themselves, see :meth:`PlantedTruth.describe`).

Blocks ``0..n_layers-2`` are no-ops (zero weights), so the embedding of the entity's last
token IS h(e) after any of them (every such layer is a site). The last block is the readout:
one attention head per attribute; its query fires only on that attribute's query word (every
template ends with "country", "continent" or "language"), its key is the entity marker, and
a BOS attention sink takes the attention of every head whose attribute is not asked, so
those read nothing. Its OV circuit is the projector onto the attribute's block, and the
unembedding row of each value word is that value's atom times ``logit_scale``, so the answer
to A is read from A's block and from nothing else. "." is the competitor: its bias is
``margin`` of a full value logit, so a value is answered only when its atom reads more than
``margin`` of a full value, and "." follows the value word. The default (0.1, one-hot codes)
is lenient: any swap that moves more than half of each atom scores as exact. ``margin=0.99``
with ``codes=dense`` grades partial swaps: a subspace 30 degrees wrong, or the block less one
dim, costs >= 0.2 disentangle, while the exact block swap stays at 1.0 (tests/test_planted.py). Coordinates: the blocks first (Country,
Continent, Language, identity), then the marker, the BOS dim, one query dim per attribute,
and unused dims up to ``d_model``.

Superposition (``superposition=k`` > 0): Country's and Continent's values are random unit
atoms (nearly orthogonal) of ONE shared block of ``k`` dims, fewer than their values; the
readout still reads each attribute's value by its atoms (Continent's head writes to ``k``
answer dims of its own, so Country's words do not read it). No subspace holds one attribute
alone, so the oracle (the shared block's projector) moves both; the reference is the
feature-swap ceiling (:meth:`PlantedTruth.feature_swap_ceiling`, in ``describe()``): the base's
atom of A replaced by the source's, the best any mask over exact value latents can do, below 1
by the atoms' interference. The exact SAE there is a JumpReLU with the true atoms (threshold
half a value), whose latents read 1 plus that interference.

Absorption (``absorption=true``, needs ``nesting=1``): the exact SAE's Country latents write
their Country atom plus f(Country)'s Continent atom and there is no Continent latent, so the
SAE still reconstructs every entity but no set of its latents moves either attribute alone;
the world itself is unchanged (its blocks stay separable for DAS and, aligned, neurons).

The truth (:class:`PlantedTruth`, ``LoadedModel.truth``) gives each block's projector at the
site, the exact SAE's weights (:meth:`PlantedTruth.sae_weights`, labels
:meth:`PlantedTruth.sae_labels`) and grades any SAE's decoder by atom recovery.
``sae=planted`` (:mod:`saeravel.saes.planted`) builds the exact SAE from the truth (or a
random orthonormal dictionary of the same subspace).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from saeravel.errors import UserError
from saeravel.models import LoadedModel, resolve_device
from saeravel.world import RAVEL_SCHEMAS, CityWorld

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ATTRIBUTES = ("Country", "Continent", "Language")
IDENTITY = "identity"
BASES = ("aligned", "rotated", "mixed")
CODES = ("onehot", "dense")
SHARED = "Country+Continent"  # the block Country and Continent share with model.superposition
SUPERPOSED = ("Country", "Continent")
SAE_THRESHOLD = 0.5  # the exact SAE's JumpReLU threshold in superposition (half a value)
QUERY_WORD = {"Country": "country", "Continent": "continent", "Language": "language"}
PREFIX_WORD = "Port"  # the shared first token of the two-token names
MIN_SPLIT_ENTITIES = 4  # train and test each need this many entities
ATTENTION_GAP = 20.0  # logit margin of the readout's attention (entity vs sink)
END_BIAS = 0.1  # default model.margin: logit of "." as a fraction of a full value logit

# Every template ends with the attribute's query word: that is what the readout's query reads.
TEMPLATES = {
    "Country": [
        "%s is a town in the country",
        "%s belongs to the country",
        "the home of %s is the country",
        "visitors to %s enter the country",
    ],
    "Continent": [
        "%s is a town on the continent",
        "%s belongs to the continent",
        "the home of %s is the continent",
        "visitors to %s reach the continent",
    ],
    "Language": [
        "%s is a town speaking the language",
        "people of %s speak the language",
        "the home of %s uses the language",
        "visitors to %s hear the language",
    ],
}

# Generic templates of a RAVEL entity type's attributes (model.entity_type other than city):
# each ends with the attribute's query word (its name lowercased, spaces as "_").
GENERIC_TEMPLATES = (
    "%s is a thing with the {q}",
    "%s belongs to the {q}",
    "the home of %s is the {q}",
    "visitors to %s see the {q}",
)
PLANTED_ENTITY_TYPES = tuple(RAVEL_SCHEMAS)


def query_word(attribute: str) -> str:
    """The word ending every template of ``attribute`` (what the readout's query reads)."""
    return QUERY_WORD.get(attribute) or attribute.lower().replace(" ", "_")


def planted_templates(attributes: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Four templates per attribute: city's own (:data:`TEMPLATES`), else the generic ones."""
    return {
        a: list(TEMPLATES[a]) if a in TEMPLATES
        else [t.format(q=query_word(a)) for t in GENERIC_TEMPLATES]
        for a in attributes
    }  # fmt: skip


def schema_sizes(entity_type: str, max_values: int) -> dict[str, int]:
    """A RAVEL type's attributes (in its order) with its value counts
    (:data:`saeravel.world.RAVEL_SCHEMAS`, written from the data), each at most
    ``max_values`` (the planted subspace needs one dim per value)."""
    if entity_type not in RAVEL_SCHEMAS:
        raise UserError(
            f"unknown model.entity_type {entity_type!r}; valid: {', '.join(PLANTED_ENTITY_TYPES)}"
        )
    return {a: min(n, max_values) for a, n in RAVEL_SCHEMAS[entity_type].items()}


_ONSETS = "b d f g k l m n p r s t v z br dr gr kl pl st tr vr".split()
_VOWELS = "a e i o u".split()
_CODAS = ["", "", "n", "r", "s", "l", "k"]


def _value(x: Any) -> str:
    """An Enum member or its string, as the string."""
    return str(getattr(x, "value", x))


def nonce_words(n: int, rng: random.Random, used: set[str], syllables: int = 3) -> list[str]:
    """``n`` new capitalised pronounceable nonsense words, none in ``used`` (updated)."""
    out: list[str] = []
    while len(out) < n:
        w = "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
        ).capitalize()
        if w not in used:
            used.add(w)
            out.append(w)
    return out


# ----------------------------------------------------------------------------- world


def split_sizes(n: int, fractions: list[float]) -> tuple[int, int, int]:
    """Train / val / test entity counts, as :func:`build_planted_world` splits."""
    n_tr, n_va = int(fractions[0] * n), int(fractions[1] * n)
    return n_tr, n_va, n - n_tr - n_va


def build_planted_world(
    n_entities: int,
    n_two_token: int,
    sizes: dict[str, int],
    nesting: float,
    split_fractions: list[float],
    seed: int,
) -> tuple[CityWorld, dict[str, list[str]], dict[str, dict[str, int]]]:
    """The nonce world, the value words per attribute (in code order) and each entity's
    value indices. The attributes are ``sizes``' keys, in order (city: Country, Continent,
    Language). Values are drawn independently per entity; a fraction ``nesting`` of the
    entities gets its second attribute (city: Continent) = f(first) for one fixed random f."""
    rng = random.Random(seed)
    attrs = list(sizes)
    first, second = attrs[0], attrs[1]
    temps_by_attr = planted_templates(attrs)
    used = {w for ts in temps_by_attr.values() for t in ts for w in t.replace("%s", " ").split()}
    used |= {PREFIX_WORD, "."}
    values = {a: nonce_words(sizes[a], rng, used, 2) for a in attrs}
    names = nonce_words(n_entities, rng, used, 3)
    names = [f"{PREFIX_WORD} {w}" if i < n_two_token else w for i, w in enumerate(names)]
    f = [rng.randrange(sizes[second]) for _ in range(sizes[first])]
    nested = set(rng.sample(range(n_entities), round(nesting * n_entities)))
    order = sorted(names)
    rng.shuffle(order)
    n_tr, n_va, _ = split_sizes(n_entities, split_fractions)
    # Training entities cover every value (each attribute's values repeated and shuffled on
    # its own, so the attributes stay independent): a mask entry of a value no training pair
    # shows cannot be learnt, and would be scored as the method's failure. The rest is drawn.
    balanced = {}
    for a in attrs:
        seq = [v % sizes[a] for v in range(n_tr)]
        rng.shuffle(seq)
        balanced[a] = seq
    train_index = {e: i for i, e in enumerate(order[:n_tr])}
    codes: dict[str, dict[str, int]] = {}
    for i, e in enumerate(names):
        if e in train_index:
            c = {a: balanced[a][train_index[e]] for a in attrs}
        else:
            c = {a: rng.randrange(sizes[a]) for a in attrs}
        if i in nested:
            c[second] = f[c[first]]
        codes[e] = c
    entity_split = {e: "train" for e in order[:n_tr]}
    entity_split.update({e: "val" for e in order[n_tr : n_tr + n_va]})
    entity_split.update({e: "test" for e in order[n_tr + n_va :]})
    template_split = {}
    for temps in temps_by_attr.values():
        for i, t in enumerate(temps):
            template_split[t] = "test" if i == len(temps) - 1 else ("val" if i == 2 else "train")
    world = CityWorld(
        entities={e: {a: values[a][codes[e][a]] for a in attrs} for e in sorted(names)},
        templates={a: list(t) for a, t in temps_by_attr.items()},
        template_split=template_split,
        entity_split=entity_split,
        few_shot_prompts={a: temps_by_attr[a][0] for a in attrs},  # zero-shot
    )
    return world, values, codes


def vocabulary(world: CityWorld) -> list[str]:
    words: set[str] = {".", PREFIX_WORD}
    for e, attrs in world.entities.items():
        words.update(e.split())
        for v in attrs.values():
            words.update(v.split())
    for temps in world.templates.values():
        for t in temps:
            words.update(t.replace("%s", " ").split())
    return sorted(words)


# ----------------------------------------------------------------------------- geometry


def mixed_pairs(blocks: dict[str, list[int]]) -> list[tuple[int, int]]:
    """Pairs of coordinates for the ``mixed`` basis: each time one dim of each of the two
    blocks with the most dims left; leftover dims of one block pair among themselves."""
    left = {b: list(ix) for b, ix in blocks.items()}
    pairs = []
    while True:
        order = sorted((b for b in left if left[b]), key=lambda b: -len(left[b]))
        if len(order) >= 2:
            pairs.append((left[order[0]].pop(0), left[order[1]].pop(0)))
        elif order and len(left[order[0]]) >= 2:
            ix = left[order[0]]
            pairs.append((ix.pop(0), ix.pop(0)))
        else:
            return pairs


def basis_matrix(basis: str, blocks: dict[str, list[int]], d_model: int, seed: int) -> torch.Tensor:
    """R [d_model, d_model], orthogonal; column j is the direction of coordinate j."""
    n_sub = sum(len(ix) for ix in blocks.values())
    R = torch.eye(d_model, dtype=torch.float64)
    if basis == "rotated":
        gen = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(n_sub, n_sub, generator=gen, dtype=torch.float64))
        R[:n_sub, :n_sub] = q * torch.sign(torch.diagonal(r))
    elif basis == "mixed":
        s = 0.5**0.5
        for i, j in mixed_pairs(blocks):
            R[i, i], R[j, i], R[i, j], R[j, j] = s, s, s, -s
    return R.float()


def value_codes(
    kind: str, sizes: dict[str, int], seed: int, superposition: int = 0
) -> dict[str, torch.Tensor]:
    """Each attribute's value codes in its block [n_values, n_values], orthonormal rows:
    ``onehot`` (the identity: a value is one dim) or ``dense`` (a random orthogonal matrix:
    every value uses every dim of its block, so a swap missing any dim misses part of every
    value's atom, and the margin can grade it). With ``superposition`` > 0, Country's and
    Continent's values are random unit vectors of their shared block of that many dims."""
    superposed = SUPERPOSED if superposition else ()
    out = {}
    for i, (a, n) in enumerate(sizes.items()):
        if a in superposed:  # nearly orthogonal: random unit vectors of the shared block
            gen = torch.Generator().manual_seed(seed * 1000 + 31 + i)
            x = torch.randn(n, superposition, generator=gen, dtype=torch.float64)
            out[a] = (x / x.norm(dim=1, keepdim=True)).float()
            continue
        if kind == "onehot":
            out[a] = torch.eye(n)
            continue
        gen = torch.Generator().manual_seed(seed * 1000 + 17 + i)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        out[a] = (q * torch.sign(torch.diagonal(r))).float()
    return out


@dataclass
class PlantedTruth:
    """What the planted world knows: every block's subspace at the site, the atoms, the
    representations. ``blocks`` maps block name -> coordinate indices (before rotation)."""

    basis: str
    d_model: int
    blocks: dict[str, list[int]]
    R: torch.Tensor
    marker: torch.Tensor
    value_scale: float
    values: dict[str, list[str]]
    codes: dict[str, dict[str, int]]
    identity_codes: dict[str, torch.Tensor]
    dims: dict[str, int] = field(default_factory=dict)  # marker, bos, query_<A>
    config: dict[str, Any] = field(default_factory=dict)
    value_codes: dict[str, torch.Tensor] = field(default_factory=dict)  # A -> [n_values, n_dims]
    margin: float = END_BIAS
    attr_block: dict[str, str] = field(default_factory=dict)  # A -> its block, where not A's own
    entity_split: dict[str, str] = field(default_factory=dict)  # entity -> train / val / test
    absorption: bool = False  # the exact SAE's Country latents carry their Continent

    def block_of(self, name: str) -> str:
        """The block holding attribute (or block) ``name``: in superposition Country and
        Continent both live in the shared block."""
        return self.attr_block.get(name, name)

    @property
    def superposed(self) -> bool:
        return SHARED in self.blocks

    def answer_basis(self, attr: str) -> torch.Tensor:
        """Where the readout head of ``attr`` writes the block it read [d_model, n]: the
        block itself, except Continent's in superposition, which writes to its own answer
        dims (else Country's value words would read the Continent head's output)."""
        key = f"answer_{attr}"
        if key not in self.dims:
            return self.block_basis(attr)
        n = len(self.blocks[self.block_of(attr)])
        return torch.eye(self.d_model)[:, self.dims[key] : self.dims[key] + n]

    def code_matrix(self, attr: str) -> torch.Tensor:
        """A's value codes in its block's coordinates, one orthonormal row per value
        (the identity for ``model.codes=onehot``)."""
        if attr in self.value_codes:
            return self.value_codes[attr]
        return torch.eye(len(self.blocks[self.block_of(attr)]))

    def value_atoms(self, attr: str) -> torch.Tensor:
        """A's value atoms at the site [n_values, d_model], unit norm, in value order: the
        readout's unembedding rows (times ``logit_scale``) and the exact SAE's decoder rows."""
        return self.code_matrix(attr) @ self.block_basis(attr).T

    @property
    def attributes(self) -> tuple[str, ...]:
        """The planted attributes, in the world's order (in superposition two of them share
        one block, so they are not the blocks)."""
        return tuple(self.values)

    def block_basis(self, name: str) -> torch.Tensor:
        """Orthonormal columns [d_model, n] spanning block ``name`` (or the block holding
        attribute ``name``) at the site."""
        name = self.block_of(name)
        if name not in self.blocks:
            raise UserError(f"no planted block {name!r}; valid: {', '.join(self.blocks)}")
        return self.R[:, self.blocks[name]]

    def projector(self, name: str) -> torch.Tensor:
        """Orthogonal projector [d_model, d_model] onto block ``name`` at the site."""
        B = self.block_basis(name)
        return B @ B.T

    def representation(self, entity: str) -> torch.Tensor:
        """h(entity) [d_model]: the residual at the site at the entity's last token."""
        c = torch.zeros(self.d_model)
        for a in self.attributes:
            c[self.blocks[self.block_of(a)]] += (
                self.value_scale * self.code_matrix(a)[self.codes[entity][a]]
            )
        c[self.blocks[IDENTITY]] = self.identity_codes[entity]
        return self.marker + self.R @ c

    def atoms(self) -> tuple[torch.Tensor, list[str]]:
        """The planted atoms [n_atoms, d_model] (unit norm) and their labels: one per value,
        +- one per identity coordinate."""
        rows, labels = [], []
        for a in self.attributes:
            for j, row in enumerate(self.value_atoms(a)):
                rows.append(row)
                labels.append(f"{a}={self.values[a][j]}")
        for j, col in enumerate(self.block_basis(IDENTITY).T):
            rows += [col, -col]
            labels += [f"{IDENTITY}[{j}]+", f"{IDENTITY}[{j}]-"]
        return torch.stack(rows), labels

    def sae_weights(self) -> dict[str, Any]:
        """The exact SAE's weights as :class:`~saeravel.saes.base.SAE` keyword arguments:
        decoder rows = :meth:`atoms`, encoder = decoder transposed, ``b_dec`` = the marker.
        Orthonormal atoms: ReLU, exact on every h(e). In superposition the value atoms are
        not orthogonal, so a JumpReLU (threshold half a value on Country's and Continent's
        latents, 0 elsewhere) keeps the other values' interference out; each true latent then
        reads 1 plus its interference with the entity's other superposed value: the SAE an
        SAE with these atoms is, not an oracle encoder."""
        if self.absorption:
            return self._absorbed_sae_weights()
        atoms, labels = self.atoms()
        kw: dict[str, Any] = {"W_enc": atoms.T.clone(), "b_enc": torch.zeros(len(atoms)),
                              "W_dec": atoms.clone(), "b_dec": self.marker.clone(),
                              "activation": "relu"}  # fmt: skip
        if self.superposed:
            sup = torch.tensor([lab.split("=")[0] in SUPERPOSED for lab in labels])
            kw["W_enc"][:, sup] = self._superposed_encoder(atoms[sup]).T
            kw["activation"] = "jumprelu"
            kw["threshold"] = sup.float() * SAE_THRESHOLD * self.value_scale
        return kw

    def _superposed_encoder(self, atoms: torch.Tensor, ridge: float = 0.01) -> torch.Tensor:
        """Encoder rows for superposed atoms [n, d_model]: each the linear filter that reads
        its own atom as exactly 1 with the least energy from all the other superposed atoms
        (``w_v = C^-1 a_v / a_v' C^-1 a_v``, ``C`` their second moment plus ``ridge``)."""
        A = atoms.double()
        S = self.block_basis(SHARED).double()
        X = A @ S  # block coordinates
        rows = []
        for v in range(len(X)):
            others = torch.cat([X[:v], X[v + 1 :]])
            C = others.T @ others + ridge * torch.eye(X.shape[1], dtype=X.dtype)
            w = torch.linalg.solve(C, X[v])
            rows.append(w / (w @ X[v]))
        return (torch.stack(rows) @ S.T).float()

    def continent_of_country(self) -> list[int]:
        """f: Country index -> Continent index, from the entities (``nesting=1``: every
        entity has Continent = f(Country); the training split shows every Country)."""
        f: dict[int, int] = {}
        for c in self.codes.values():
            if f.setdefault(c["Country"], c["Continent"]) != c["Continent"]:
                raise UserError("absorption needs model.nesting=1 (Continent = f(Country))")
        return [f[i] for i in range(len(self.values["Country"]))]

    def sae_labels(self) -> list[str]:
        """The exact SAE's latent labels, in latent order (:meth:`atoms`' labels, less the
        Continent latents under absorption)."""
        _, labels = self.atoms()
        if self.absorption:
            labels = [lab for lab in labels if not lab.startswith("Continent=")]
        return labels

    def _absorbed_sae_weights(self) -> dict[str, Any]:
        """Absorption: each Country latent reads its Country atom and writes that atom plus
        its Continent's (exact, as every entity's Continent is f(Country)); no Continent
        latent exists, so no set of latents moves Continent alone or Country alone."""
        atoms, labels = self.atoms()
        keep = [i for i, lab in enumerate(labels) if not lab.startswith("Continent=")]
        enc, dec = atoms[keep].clone(), atoms[keep].clone()
        cont = self.value_atoms("Continent")
        for j, k in enumerate(self.continent_of_country()):
            dec[j] = dec[j] + cont[k]  # Country latents come first in atoms()
        return {"W_enc": enc.T.contiguous(), "b_enc": torch.zeros(len(keep)), "W_dec": dec,
                "b_dec": self.marker.clone(), "activation": "relu"}  # fmt: skip

    @torch.no_grad()
    def readout(self, attr: str, H: torch.Tensor) -> torch.Tensor:
        """The readout's answer to ``attr`` for each row of ``H`` [n, d_model]: the value
        index whose atom reads most, or -1 where none reads more than ``margin`` ("." wins)."""
        read = (H - self.marker) @ self.value_atoms(attr).T
        best, idx = read.max(dim=1)
        return torch.where(best > self.margin * self.value_scale, idx, -1)

    @torch.no_grad()
    def feature_swap_ceiling(
        self, split: str = "test", attributes: tuple[str, ...] = SUPERPOSED
    ) -> dict[str, dict[str, Any]]:
        """The best any mask over exact value latents can do, per attribute A of
        ``attributes``: the base's atom of A replaced by the source's, ``h_b - a_A(b) +
        a_A(s)``, over every ordered pair of ``split`` entities the model knows. Cause: pairs
        whose A values differ answer the source's; isolation: each other attribute of
        ``attributes`` (RAVEL's default pair, Country and Continent) keeps the base's answer,
        also given per attribute of the world (``isolation_by_attribute``)."""
        ents = [e for e in sorted(self.codes) if self.entity_split.get(e) == split]
        H = torch.stack([self.representation(e) for e in ents])
        idx = {a: torch.tensor([self.codes[e][a] for e in ents]) for a in self.attributes}
        known = torch.ones(len(ents), dtype=torch.bool)
        for a in self.attributes:
            known &= self.readout(a, H) == idx[a]
        H = H[known]
        idx = {a: v[known] for a, v in idx.items()}
        n = len(H)
        out: dict[str, dict[str, Any]] = {}
        if n < 2:
            return out
        b, s = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        b, s = b.flatten(), s.flatten()
        for a in attributes:
            A = self.value_atoms(a) * self.value_scale
            Hs = H[b] - A[idx[a][b]] + A[idx[a][s]]
            diff = idx[a][b] != idx[a][s]
            cause = float((self.readout(a, Hs) == idx[a][s])[diff].float().mean())
            by = {o: round(float((self.readout(o, Hs) == idx[o][b]).float().mean()), 4)
                  for o in self.attributes if o != a}  # fmt: skip
            iso = sum(by[o] for o in attributes if o != a) / max(1, len(attributes) - 1)
            out[a] = {"cause": round(cause, 4), "isolation": round(iso, 4),
                      "disentangle": round((cause + iso) / 2, 4), "isolation_by_attribute": by,
                      "n_entities": n}  # fmt: skip
        return out

    @torch.no_grad()
    def atom_recovery(self, sae: Any) -> dict[str, Any]:
        """For each planted atom the max cosine to the SAE's decoder rows; mean and min,
        overall and per block, and the fraction of atoms recovered at cosine >= 0.9."""
        atoms, labels = self.atoms()
        dec = sae.W_dec.detach().float().cpu()
        dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        best = (atoms @ dec.T).max(dim=1).values
        out: dict[str, Any] = {
            "mean": float(best.mean()),
            "min": float(best.min()),
            "frac_above_0.9": float((best >= 0.9).float().mean()),
            "n_atoms": len(labels),
            "d_sae": int(dec.shape[0]),
            "per_block": {},
        }
        for b in [*self.attributes, IDENTITY]:
            sel = torch.tensor([lab.startswith(b) for lab in labels])
            out["per_block"][b] = {"mean": float(best[sel].mean()), "min": float(best[sel].min())}
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: basis, block sizes and coordinates, the constant part."""
        n_sub = sum(len(ix) for ix in self.blocks.values())
        out = {
            "basis": self.basis,
            "d_model": self.d_model,
            "blocks": {b: len(ix) for b, ix in self.blocks.items()},
            "block_coordinates": {b: [ix[0], ix[-1] + 1] for b, ix in self.blocks.items()},
            "planted_subspace_dims": n_sub,
            "constant_part": "entity-marker direction (coordinate "
            f"{self.dims['marker']}, outside the rotated subspace), norm 1",
            "value_scale": self.value_scale,
            "margin": self.margin,
            "n_entities": len(self.codes),
            **self.config,
        }
        if self.superposed:
            out["superposition"] = {
                "shared_block": SHARED, "dims": len(self.blocks[SHARED]),
                "values": sum(len(self.values[a]) for a in SUPERPOSED),
                "oracle": "no subspace holds Country or Continent alone: the oracle swaps the "
                "shared block (both attributes); feature_swap_ceiling is the reference",
                "feature_swap_ceiling": self.feature_swap_ceiling(),
            }  # fmt: skip
        if self.basis == "mixed":
            owner = {i: b for b, ix in self.blocks.items() for i in ix}
            pairs = mixed_pairs(self.blocks)
            cross = sum(owner[i] != owner[j] for i, j in pairs)
            out["mixed"] = {"pairs": len(pairs), "cross_attribute_pairs": cross,
                            "unmixed_dims": n_sub - 2 * cross}  # fmt: skip
        return out


# ----------------------------------------------------------------------------- model


def build_readout_model(
    truth: PlantedTruth, world: CityWorld, tokenizer: Any, n_layers: int, n_ctx: int,
    logit_scale: float, device: str = "cpu",
) -> Any:  # fmt: skip
    """The analytic HookedTransformer: no-op blocks, then the per-attribute readout block."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    d, n_heads = truth.d_model, len(truth.attributes)
    d_head = max(len(truth.blocks[truth.block_of(a)]) for a in truth.attributes)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d, n_heads=n_heads, d_head=d_head, d_vocab=len(tokenizer),
        n_ctx=n_ctx, attn_only=True, normalization_type=None, act_fn="relu",
        positional_embedding_type="standard", default_prepend_bos=True, device=device, seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    sd = model.state_dict()
    for k, _ in model.named_parameters():  # every weight zero; buffers (masks) kept
        sd[k] = torch.zeros_like(sd[k])
    ids = tokenizer.convert_tokens_to_ids
    W_E = sd["embed.W_E"]
    W_E[tokenizer.bos_token_id, truth.dims["bos"]] = 1.0
    for e in world.entities:
        W_E[ids(e.split()[-1])] = truth.representation(e)
    for a in truth.attributes:
        W_E[ids(query_word(a)), truth.dims[f"query_{a}"]] = 1.0
    L = n_layers - 1
    scale = d_head**0.5  # cancels the attention's 1/sqrt(d_head)
    for h, a in enumerate(truth.attributes):
        B = truth.block_basis(a)
        n = B.shape[1]
        sd[f"blocks.{L}.attn.W_Q"][h, truth.dims[f"query_{a}"], 0] = 2 * ATTENTION_GAP * scale
        sd[f"blocks.{L}.attn.b_Q"][h, 1] = ATTENTION_GAP * scale
        sd[f"blocks.{L}.attn.W_K"][h, truth.dims["marker"], 0] = 1.0
        sd[f"blocks.{L}.attn.W_K"][h, truth.dims["bos"], 1] = 1.0
        sd[f"blocks.{L}.attn.W_V"][h, :, :n] = B
        out = truth.answer_basis(a)  # where the head writes what it read (B's coordinates)
        sd[f"blocks.{L}.attn.W_O"][h, :n, :] = out.T
        for v, code in zip(truth.values[a], truth.code_matrix(a), strict=True):
            sd["unembed.W_U"][:, ids(v)] = logit_scale * (out @ code)
    # "." is the competitor every value must beat: a value is answered only when its atom
    # reads more than `margin` of a full value (and after the value, where no head reads
    # anything, "." ends the answer).
    sd["unembed.b_U"][ids(".")] = truth.margin * logit_scale * truth.value_scale
    model.load_state_dict(sd)
    if not hasattr(model, "ln_final"):  # normalization_type=None has none; SuffixRunner calls it
        model.ln_final = torch.nn.Identity()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class PlantedModel:
    """Model source for ``model=planted-city-lm`` (see the module docstring); builds in
    well under a second, so nothing is cached. The arguments are checked by :meth:`validate`
    (first thing in :meth:`load` and :meth:`key`), not in ``__init__``: Hydra's ``instantiate``
    would wrap a :class:`UserError` raised there into a multi-line traceback."""

    own_world = True  # the planted world: RAVEL data and SAE training text offline

    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self._kwargs = kwargs
        self._valid = False

    def offline_needs(self, ctx: Any) -> list[Any]:
        """Nothing: it is built analytically at run time."""
        from saeravel.offline import Skip

        why = "planted: built analytically at run time, nothing to fetch"
        return [Skip(f"model={self.name}", why)]

    def validate(self) -> None:
        """One-line :class:`UserError` for a config that cannot be built (nothing heavy)."""
        if not self._valid:
            self._setup(self.name, **self._kwargs)
            self._valid = True

    def _setup(
        self,
        name: str,
        n_layers: int,
        d_model: int,
        default_layer: int,
        n_entities: int = 200,
        n_two_token: int = 4,
        n_country: int = 40,
        n_continent: int = 6,
        n_language: int = 12,
        entity_type: Any = "city",
        max_values: int = 12,
        id_dims: int = 8,
        basis: Any = "aligned",
        nesting: float = 0.0,
        absorption: bool = False,
        value_scale: float = 1.0,
        logit_scale: float = 10.0,
        margin: float = END_BIAS,
        codes: Any = "onehot",
        superposition: int = 0,
        split_fractions: list[float] | None = None,
        world_seed: int = 0,
        basis_seed: int = 0,
        site_layer: int | None = None,
        n_ctx: int = 64,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 64,
    ) -> None:
        self.name = name
        basis = _value(basis)
        if basis not in BASES:
            raise UserError(f"unknown model.basis {basis!r}; valid: {', '.join(BASES)}")
        codes = _value(codes)
        if codes not in CODES:
            raise UserError(f"unknown model.codes {codes!r}; valid: {', '.join(CODES)}")
        if not 0.0 <= margin < 1.0:
            raise UserError(
                f"model.margin={margin} must be in [0, 1): the fraction of a full value the "
                "right value's atom must read (at >= 1 not even the true value is answered)"
            )
        if dtype != "float32":
            raise UserError(f"model {name} is built in float32 only; got model.dtype={dtype}")
        entity_type = _value(entity_type)
        if entity_type == "city":  # today's schema: the counts are model.n_*
            self.sizes = {"Country": n_country, "Continent": n_continent, "Language": n_language}
            for a, n in self.sizes.items():
                if n < 2:
                    raise UserError(f"model.n_{a.lower()}={n}: an attribute needs >= 2 values")
        else:
            if max_values < 2:
                raise UserError(f"model.max_values={max_values}: an attribute needs >= 2 values")
            self.sizes = schema_sizes(entity_type, max_values)
        if id_dims < 0:
            raise UserError(f"model.id_dims={id_dims} must be >= 0")
        if (superposition or absorption) and entity_type != "city":
            raise UserError(
                f"model.superposition / model.absorption are dials of the city schema (Country, "
                f"Continent); model.entity_type={entity_type} has neither"
            )
        n_sup = self.sizes["Country"] + self.sizes["Continent"] if superposition else 0
        if superposition and not 2 <= superposition < n_sup:
            raise UserError(
                f"model.superposition={superposition} must be 0 (off) or in 2..{n_sup - 1}: "
                f"the dims Country and Continent share, fewer than their {n_sup} values"
            )
        n_sub = sum(self.sizes.values()) + id_dims
        if superposition:
            n_sub += superposition - n_sup
        need = n_sub + 2 + len(self.sizes) + superposition  # + Continent's answer dims
        if d_model < need:
            raise UserError(
                f"model.d_model={d_model} is too small for the planted world: it needs >= {need} "
                f"({n_sub} planted dims + marker + BOS + {len(self.sizes)} query dims"
                f"{f' + {superposition} answer dims' if superposition else ''})"
            )
        if n_layers < 2:
            raise UserError(
                f"model.n_layers={n_layers}: needs >= 2 (no-op blocks, then the readout)"
            )
        for what, lay in (("model.default_layer", default_layer), ("layer", site_layer)):
            if lay is not None and not 0 <= lay <= n_layers - 2:
                raise UserError(
                    f"{what}={lay} is not a site of {name}: the residual after blocks "
                    f"0..{n_layers - 2} carries h(e) (block {n_layers - 1} is the readout)"
                )
        if not 0.0 <= nesting <= 1.0:
            raise UserError(f"model.nesting={nesting} must be in [0, 1]")
        if absorption and (nesting != 1.0 or superposition or codes != "onehot"):
            raise UserError(
                f"model.absorption=true needs model.nesting=1.0 (got {nesting}: the absorbed "
                "Country atoms carry f(Country)'s Continent), model.superposition=0 and "
                "model.codes=onehot"
            )
        if not 0 <= n_two_token <= n_entities:
            raise UserError(f"model.n_two_token={n_two_token} must be in 0..{n_entities}")
        fr = list(split_fractions if split_fractions is not None else [0.6, 0.1, 0.3])
        if len(fr) != 3 or any(f < 0 for f in fr) or sum(fr) > 1 + 1e-9:
            raise UserError(f"model.split_fractions={fr}: three fractions >= 0 summing to <= 1")
        n_tr, _, n_te = split_sizes(n_entities, fr)
        if min(n_tr, n_te) < MIN_SPLIT_ENTITIES:
            raise UserError(
                f"planted world too small for the split: model.n_entities={n_entities} with "
                f"model.split_fractions={fr} gives {n_tr} train / {n_te} test entities; each "
                f"needs >= {MIN_SPLIT_ENTITIES}"
            )
        self.n_layers, self.d_model, self.n_ctx = n_layers, d_model, n_ctx
        self.cfg = {
            "n_entities": n_entities, "n_two_token": n_two_token, "sizes": self.sizes,
            "id_dims": id_dims, "basis": basis, "nesting": nesting, "value_scale": value_scale,
            "logit_scale": logit_scale, "margin": margin, "codes": codes, "superposition": superposition,
            "absorption": absorption, "split_fractions": fr,
            "world_seed": world_seed,
            "basis_seed": basis_seed, "n_layers": n_layers, "d_model": d_model, "n_ctx": n_ctx,
        }  # fmt: skip
        if entity_type != "city":  # city's key (and caches) stay as before the dial existed
            self.cfg.update({"entity_type": entity_type, "max_values": max_values})
        self.device = resolve_device(device)

    def key(self) -> str:
        self.validate()
        blob = json.dumps({"v": FORMAT_VERSION, **self.cfg}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def build_truth(self) -> tuple[PlantedTruth, CityWorld]:
        self.validate()
        c = self.cfg
        world, values, codes = build_planted_world(
            c["n_entities"], c["n_two_token"], self.sizes, c["nesting"], c["split_fractions"],
            c["world_seed"],
        )  # fmt: skip
        blocks: dict[str, list[int]] = {}
        start = 0
        sup = c["superposition"]
        own = [(a, n) for a, n in self.sizes.items() if not (sup and a in SUPERPOSED)]
        for b, n in [*([(SHARED, sup)] if sup else []), *own, (IDENTITY, c["id_dims"])]:
            blocks[b] = list(range(start, start + n))
            start += n
        dims = {"marker": start, "bos": start + 1}
        dims.update({f"query_{a}": start + 2 + i for i, a in enumerate(self.sizes)})
        if sup:
            dims["answer_Continent"] = start + 2 + len(self.sizes)
        R = basis_matrix(c["basis"], blocks, self.d_model, c["basis_seed"])
        marker = torch.zeros(self.d_model)
        marker[dims["marker"]] = 1.0
        gen = torch.Generator().manual_seed(c["world_seed"] + 1)
        k = c["id_dims"]
        ident = {
            e: torch.randn(k, generator=gen) * c["value_scale"] / max(1, k) ** 0.5
            for e in sorted(codes)
        }
        truth = PlantedTruth(
            basis=c["basis"], d_model=self.d_model, blocks=blocks, R=R, marker=marker,
            value_scale=c["value_scale"], values=values, codes=codes, identity_codes=ident,
            dims=dims, config={"nesting": c["nesting"], "id_dims": k, "world_seed": c["world_seed"],
                               "basis_seed": c["basis_seed"], "n_two_token": c["n_two_token"],
                               "codes": c["codes"], "superposition": sup,
                               "absorption": c["absorption"]},
            entity_split=dict(world.entity_split), absorption=c["absorption"],
            value_codes=value_codes(c["codes"], self.sizes, c["world_seed"], sup),
            margin=c["margin"], attr_block={a: SHARED for a in SUPERPOSED} if sup else {},
        )  # fmt: skip
        return truth, world

    def load(self, sae_kwargs: dict[str, Any] | None = None) -> LoadedModel:
        """Build the world, the truth and the analytic model."""
        from saeravel.tiny_lm import build_tokenizer

        self.validate()
        if sae_kwargs:
            raise UserError(
                f"model {self.name} is built here with no weight processing; an SAE asking for "
                f"{sae_kwargs} was trained on another model"
            )
        truth, world = self.build_truth()
        tokenizer = build_tokenizer(vocabulary(world))
        model = build_readout_model(
            truth, world, tokenizer, self.n_layers, self.n_ctx, self.cfg["logit_scale"], self.device
        )
        info = {
            "embedded": True,
            "planted": truth.describe(),
            "cache_folder_key": f"planted-{self.key()}",
            "site_layers": list(range(self.n_layers - 1)),
        }
        return LoadedModel(model=model, name=self.name, processing={}, world=world, info=info,
                           truth=truth)  # fmt: skip
