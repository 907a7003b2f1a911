"""RAVEL scoring and training diagnostics: token-level matching (byte-level BPE), pair
construction, the soft-capped rotary suffix forward, bootstrap intervals, RAVEL's aggregate,
convergence flags, the greedy mask refinement, the oracle reference and value checks."""

from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from saeravel.errors import UserError
from saeravel.evals.ravel.config import RavelEvalConfig
from saeravel.evals.ravel.featurizers import ProjectorSwap
from saeravel.evals.ravel.intervene import (
    NeuronMask,
    SuffixRunner,
    batches_by_prefix,
    naive_logits,
    temperature,
)
from saeravel.evals.ravel.main import validate
from saeravel.evals.ravel.pairs import RavelJob, known_filter
from saeravel.evals.ravel.prompts import Pair, Prompt, label_ids, make_pairs, matches
from saeravel.evals.ravel.score import bootstrap_ci, ravel_aggregate
from saeravel.evals.ravel.train import TeacherForced, _rates, convergence, refine_mask
from saeravel.world import CityWorld

# ----------------------------------------------------------------------------- BPE matching


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (GPT-2's scheme) trained offline on city sentences, so
    " Canada", " North", " United", " Niger" and " Nigeria" are tokens of their own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = ["Canada", "North America", "United States", "United Kingdom", "Niger", "Nigeria"]
    corpus = [f"Toronto is a city in the country of {w}. Paris is in {w}." for w in words] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_bpe_answer_with_punctuation_matches_its_label(bpe):
    prompt = "Toronto is a city in the country of"
    gen = bpe(" Canada. Toronto", add_special_tokens=False)["input_ids"]
    assert bpe.decode(gen[:1]) == " Canada"  # one token, the "." is the next one
    lab = label_ids(bpe, prompt, "Canada")
    assert matches(gen, lab, "first_token")
    assert matches(gen[:1], lab, "prefix")
    # The old rule compared the first decoded *word*: " Canada." is not "Canada".
    assert bpe.decode(gen).split()[0] != "Canada"


def test_bpe_multi_word_labels_and_token_prefixes(bpe):
    prompt = "Toronto is a city in the continent of"
    na = label_ids(bpe, prompt, "North America")
    assert len(na) >= 2 and bpe.decode(na[:1]) == " North"
    assert matches(na[:1], na, "first_token") and matches(na[:1], na, "prefix")
    us, uk = label_ids(bpe, prompt, "United States"), label_ids(bpe, prompt, "United Kingdom")
    assert matches(us, uk, "first_token")  # same first token: such pairs are dropped
    assert not matches(us, uk, "prefix")
    niger, nigeria = label_ids(bpe, prompt, "Niger"), label_ids(bpe, prompt, "Nigeria")
    assert niger[0] != nigeria[0]
    assert not matches(nigeria, niger, "prefix")  # characters would say "Niger" ~ "Nigeria"
    with pytest.raises(UserError, match="valid: first_token, prefix"):
        matches([1], [1], "first_word")


# ----------------------------------------------------------------------------- pairs


def _world() -> CityWorld:
    vals = ["France", "Spain", "Italy", "Chile", "Peru", "Japan"]
    ents = {f"e{i}": {"Country": vals[i % 6], "Continent": ["Europe", "Asia"][i % 2]}
            for i in range(12)}  # fmt: skip
    return CityWorld(entities=ents)


class WordTok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 1000 for w in text.split()]}


def test_pairs_are_unique_and_cause_targets_are_known():
    w = _world()
    ents = sorted(w.entities)
    prompts = {e: [Prompt("%s is in", e, "Country", [0, 1, 2], 1, 1)] for e in ents}
    bases = [p for ps in prompts.values() for p in ps]
    known = {("%s is in", e) for e in ents if e != "e3"}  # e3's answer is unknown
    pairs = make_pairs(bases, prompts, w, "Country", WordTok(), 500, random.Random(0), True,
                       ents, "first_token", known)  # fmt: skip
    keys = [(id(q.base), id(q.source)) for q in pairs]
    assert len(keys) == len(set(keys))  # drawn without duplicates
    assert all(q.source.entity != "e3" for q in pairs)
    for q in pairs:
        assert q.target_tokens[0] == q.target_token
        assert w.entities[q.source.entity]["Country"] == q.target


# ----------------------------------------------------------------------------- suffix forward


def test_suffix_runner_equals_full_forward_with_soft_cap_and_rotary(capped_rotary):
    m = capped_rotary
    rng = random.Random(0)
    prompts = []
    for prefix in ([1, 5, 6], [1, 7]):
        for _ in range(6):
            ent = [rng.randrange(10, 40) for _ in range(rng.choice([1, 2]))]
            tail = [rng.randrange(10, 50) for _ in range(rng.choice([1, 3]))]
            toks = prefix + ent + tail
            prompts.append(Prompt("t", "e", "A", toks, len(prefix), len(prefix) + len(ent) - 1))
    for layer in (0, 1):
        runner = SuffixRunner(m, layer)
        runner.prepare(prompts)
        for batch in batches_by_prefix(prompts, lambda p: p.prefix, 4, random.Random(1)):
            vec = torch.randn(len(batch), 32) * 3
            fast, ref = runner.logits(batch, vec), naive_logits(m, batch, vec, layer)
            assert fast.abs().max() <= 5.0  # the cap is applied
            torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- statistics


def _pairs(spec: list[tuple[str, str, str, str]]) -> list[Pair]:
    """(kind, base entity, base attribute, template) per pair."""
    out = []
    for kind, ent, attr, tmpl in spec:
        p = Prompt(tmpl, ent, attr, [0, 1], 1, 1)
        out.append(Pair(p, p, "A", kind, "x", 0, [0]))
    return out


def test_bootstrap_interval_brackets_the_score_and_is_seeded():
    spec = [("cause", f"e{i}", "A", "t") for i in range(40)]
    spec += [("isolation", f"e{i}", "B", "t") for i in range(40)]
    pairs = _pairs(spec)
    ok = [i % 3 != 0 for i in range(40)] + [i % 4 != 0 for i in range(40)]
    ci = bootstrap_ci(ok, pairs, 500, 0.95, seed=0)
    assert ci == bootstrap_ci(ok, pairs, 500, 0.95, seed=0)
    cause = sum(ok[:40]) / 40
    assert ci["cause"][0] < cause < ci["cause"][1]
    assert 0.05 < ci["cause"][1] - ci["cause"][0] < 0.5
    perfect = bootstrap_ci([True] * 80, pairs, 200, 0.95, seed=0)
    assert perfect["disentangle"] == [1.0, 1.0]


def test_ravel_aggregate_averages_templates_then_attributes():
    # Cause: template t1 has 3 pairs (all right), t2 has 1 pair (wrong): pooled 0.75,
    # RAVEL's mean over templates 0.5. Isolation: attribute B 1.0 (2 pairs), C 0.0 (1 pair).
    spec = [("cause", "e1", "A", "t1")] * 3 + [("cause", "e2", "A", "t2")]
    spec += [("isolation", "e1", "B", "tb")] * 2 + [("isolation", "e1", "C", "tc")]
    pairs = _pairs(spec)
    ok = [True, True, True, False, True, True, False]
    agg = ravel_aggregate(ok, pairs, "A")
    assert agg == {"cause": 0.5, "isolation": 0.5, "disentangle": 0.5}
    pooled = _rates(ok, pairs)
    assert pooled["cause"] == 0.75 and pooled["isolation"] == pytest.approx(2 / 3)


def test_convergence_flags():
    assert convergence([2.0, 1.0, 0.999])["flattened"] is True
    flat = convergence([2.0, 1.2, 1.0])
    assert flat["flattened"] is False and flat["last_epoch_change"] == pytest.approx(-1 / 6)
    assert convergence([1.0])["flattened"] is None


def test_temperature_anneal_fraction_then_constant():
    assert temperature(0, 100, 10, 0.1, "linear", 0.5) == 10
    assert temperature(49, 100, 10, 0.1, "linear", 0.5) == pytest.approx(0.1)
    assert temperature(99, 100, 10, 0.1, "linear", 0.5) == pytest.approx(0.1)
    assert temperature(50, 100, 2.0, 0.1, "constant") == 2.0


# ----------------------------------------------------------------------------- refinement


class ToyRunner:
    """Logits = W v: a query about A reads dims 0-1 (tokens 0, 1), about B dims 2-3 (tokens
    2, 3); dims 4-5 are noise nothing reads."""

    def __init__(self) -> None:
        self.W = torch.zeros(4, 6)
        self.W[0, 0] = self.W[1, 1] = self.W[2, 2] = self.W[3, 3] = 4.0

    def logits(self, bases, v, n_last=None):
        out = v @ self.W.T
        is_a = torch.tensor([p.attribute == "A" for p in bases])[:, None]
        other = torch.where(is_a, torch.tensor([0, 0, 1, 1]), torch.tensor([1, 1, 0, 0])).bool()
        return out.masked_fill(other, -1e4)


def test_refinement_finds_the_mask_the_optimiser_missed():
    """Cause pairs want tokens from dims 0-1 of the source, isolation pairs the base's dims 2-3:
    the best mask keeps exactly {0, 1}. Starting from a wrong mask (keeps 2, 3), the greedy
    search must reach it and lower the training CE; flipping the unread dims 4-5 changes
    nothing, so they are left as they were."""
    rng = torch.Generator().manual_seed(0)
    pairs, vecs = [], {}
    for i in range(40):
        a_b, a_s, b_b = i % 2, 1 - i % 2, (i // 2) % 2
        b = torch.zeros(6)
        b[a_b], b[2 + b_b] = 1.0, 1.0
        s = torch.zeros(6)
        s[a_s], s[3 - b_b] = 1.0, 1.0
        b[4:] = torch.randn(2, generator=rng)
        s[4:] = torch.randn(2, generator=rng)
        kind = "cause" if i % 4 < 2 else "isolation"
        pb = Prompt("t", f"b{i}", "A" if kind == "cause" else "B", [0], 0, 0)
        ps = Prompt("t", f"s{i}", "A", [0], 0, 0)
        vecs[id(pb)], vecs[id(ps)] = b, s
        tgt = a_s if kind == "cause" else 2 + b_b
        pairs.append(Pair(pb, ps, "A", kind, "x", tgt, [tgt]))
    bank = lambda prompts: torch.stack([vecs[id(p)] for p in prompts])  # noqa: E731
    method = NeuronMask(6)
    with torch.no_grad():
        method.mask.param.copy_(torch.tensor([-0.1, -0.2, 0.3, 0.2, -0.1, -0.3]))
    cfg = OmegaConf.structured(RavelEvalConfig(recipe="saeravel"))
    ctx = SimpleNamespace(seed=0, model=None, layer=0)
    info = refine_mask(RavelJob(cfg, ctx, bank=bank, runner=ToyRunner()), method, pairs, "toy")
    assert (method.mask.param > 0).nonzero().flatten().tolist() == [0, 1]
    assert info["train_ce_hard_after"] < info["train_ce_hard_before"]
    assert info["flips"] == 4 and info["candidates"] == 6


def test_oracle_swaps_only_the_projected_subspace():
    P = torch.zeros(4, 4)
    P[1, 1] = P[2, 2] = 1.0
    b, s = torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[5.0, 6, 7, 8]])
    out = ProjectorSwap(P)(b, s)
    assert out.tolist() == [[1.0, 6, 7, 4]]


# ----------------------------------------------------------------------------- value checks


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"epochs": 0}, "eval.epochs=0 must be an integer >= 1"),
        ({"batch_size": -4}, "eval.batch_size=-4 must be an integer >= 1"),
        ({"lr": -1.0}, r"eval.lr=-1.0 must be a finite number > 0"),
        ({"split_fractions": [0.6, 0.1, 0.1]}, "summing to 1"),
        ({"max_entities": 0}, "eval.max_entities=0 must be >= 2"),
        ({"attributes": ["Country"]}, "at least two attributes"),
        ({"mask": {"t_end": 0.0}}, r"eval.mask.t_end=0.0 must be a finite number > 0"),
        ({"mask": {"anneal_fraction": 0.0}}, "anneal_fraction=0.0 must be in"),
        ({"confidence": 1.0}, r"eval.confidence=1.0 must be in \(0, 1\)"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    cfg = OmegaConf.merge(OmegaConf.structured(RavelEvalConfig(recipe="saeravel")), override)
    with pytest.raises(UserError, match=message) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- filter cache


def test_knowledge_filter_cache_is_validated_and_rebuilt(tiny_model, tmp_path, caplog):
    from saeravel.evals.ravel.prompts import bos_id, tokenize_prompt

    m = tiny_model.model
    ents = list(tiny_model.world.entities)[:6]
    prompts = [tokenize_prompt(m.tokenizer, "%s lies in the country of", e, "Country", bos_id(m))
               for e in ents]  # fmt: skip
    cfg = OmegaConf.structured(RavelEvalConfig(recipe="saeravel"))
    ctx = SimpleNamespace(model=tiny_model, cache_dir=tmp_path)
    first = known_filter(cfg, ctx, tiny_model.world, prompts)
    (path,) = (tmp_path / "ravel_filter").glob("*.json")
    for bad in (
        "",
        "{not json",
        json.dumps({"format": 2, "known": [True]}),
        json.dumps([True] * 6),
    ):
        path.write_text(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again = known_filter(cfg, ctx, tiny_model.world, prompts)
        assert again == first
        assert "knowledge-filter cache" in caplog.text and "rebuilding" in caplog.text
    assert json.loads(path.read_text())["n"] == len(prompts)


def test_teacher_forced_logits_through_the_runner_equal_the_full_forward(capped_rotary):
    """With match=prefix, training reads every label token: the base prompt extended by the
    label's tokens but the last, logits at its last len(label) positions."""
    m = capped_rotary
    base = [Prompt("t", f"e{i}", "A", [1, 5, 6, 10 + i, 20, 21], 3, 3) for i in range(4)]
    pairs = [Pair(b, b, "A", "cause", "x", 30 + i, [30 + i, 31, 32][: 1 + i % 3], {})
             for i, b in enumerate(base)]  # fmt: skip
    forced = TeacherForced(3)
    ext = [forced.prompt(q) for q in pairs]
    assert ext[2].tokens == base[2].tokens + [32, 31] and ext[0].tokens == base[0].tokens
    assert forced.prompt(pairs[2]) is ext[2]  # made once
    runner = SuffixRunner(m, 0)
    runner.prepare(ext)
    vec = torch.randn(4, 32)
    n = [len(forced.labels(q)) for q in pairs]
    fast = runner.logits(ext, vec, n)
    assert fast.shape == (sum(n), 50)
    torch.testing.assert_close(fast, naive_logits(m, ext, vec, 0, n), atol=1e-4, rtol=1e-4)
    # The last position of each extended prompt is what the plain (first-token) call returns.
    ends = [sum(n[: i + 1]) - 1 for i in range(4)]
    torch.testing.assert_close(fast[ends], runner.logits(ext, vec), atol=1e-5, rtol=1e-5)
