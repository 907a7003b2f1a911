"""``eval=autointerp``: SAEBench's automated interpretability score with an LLM judge.

Procedure, per SAE:

1. Latent activations over a text stream: a Hugging Face dataset packed into rows of
   ``context_size`` tokens (as ``eval=core``), or fact sequences of the embedded city world.
   Special tokens (BOS/EOS/pad/sep) are never counted and never shown.
2. Latents: ``override_latents``, else ``n_latents`` drawn (seeded) from the *alive* latents,
   those active (``> 0``) on more than ``dead_latent_threshold`` counted tokens.
3. Windows of ``2 * buffer + 1`` tokens around a centre token (cut at the row's ends):

   * *top*: the centres with the largest activations, greedily, skipping a centre within
     ``buffer`` tokens of one already chosen in the same row (``no_overlap``);
   * *importance-sampled*: centres drawn without replacement with probability proportional to
     the squared activation, among tokens with ``act_threshold < act < min(top centres)``;
   * *random*: uniformly drawn centres whose whole window has no activation above
     ``act_threshold``.

   ``act_threshold = act_threshold_frac * max activation``. A window is *active* when one of
   its tokens exceeds ``act_threshold``. The top windows are split at random into the
   explanation and the scoring set, as are the importance-sampled ones.
4. The judge sees the explanation windows (strongest first, active tokens marked
   ``<<token>>``) and writes a one-sentence explanation; then, given the explanation and the
   shuffled, unmarked scoring windows (top + importance-sampled + random), it lists the windows
   it predicts to be active.
5. A latent's score is the fraction of scoring windows classified correctly (predicted active
   == active). ``autointerp_score`` is the mean over scored latents, ``autointerp_std_dev``
   their sample standard deviation. A latent whose answer cannot be parsed, or whose request
   failed after the client's retries, is NaN with the reason recorded and left out of both.

The judge is any OpenAI-compatible chat-completions endpoint (``judge.base_url``,
``judge.model``), with the API key read from the environment variable ``judge.api_key_env``.
Every answer is cached under ``<cache_dir>/autointerp`` keyed by a hash of the model, the
messages and the generation parameters, so a rerun makes no request.

Differences from SAEBench (``sae_bench/evals/autointerp/main.py``, v0.6.0):

1. Judge: SAEBench calls OpenAI's ``gpt-4o-mini`` with the API's default temperature and no
   answer cache; ours any OpenAI-compatible endpoint, temperature 0 by default, cached.
2. Random scoring windows: SAEBench draws them uniformly and labels them inactive without
   looking (their activations are set to 0), so a random window where the latent fires counts
   against a correct prediction; ours draws only windows with no activation above
   ``act_threshold``, so the label is true.
3. Importance-sampled windows: SAEBench samples among all positive activations below the
   smallest top activation, so a window below ``act_threshold`` can be scored as "inactive";
   ours samples above ``act_threshold`` only.
4. A latent with no importance-sampling candidate: SAEBench skips it silently (reported
   neither as scored nor as dead); ours scores it with the windows it has.
5. Special tokens: SAEBench zeroes their activations but shows them in the windows (BOS as
   its string); ours never shows or counts them.
6. Unparseable answers: SAEBench drops the latent (and a failed request raises); ours records
   the latent as NaN with the reason and leaves it out of the mean and standard deviation.
7. Parsing: SAEBench keeps the text after the last "activates on" and reads predictions as
   digits separated by commas or "and"; ours strips a "The latent fires on" preamble, reads
   the first line, and accepts ``#3`` / ``[1, 2]`` forms and "no examples".
8. Text: SAEBench reads ``total_tokens`` of its dataset in rows of ``llm_context_size``; ours
   packs rows that start with BOS (as ``eval=core``), or the embedded world's fact sequences.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import random
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm.auto import tqdm

from saeravel.activations import (
    counted_mask,
    encode_latents,
    hook_activations,
    latent_firing_counts,
    special_token_ids,
)
from saeravel.errors import UserError
from saeravel.evals.api import EvalContext, EvalOutput, TextSourceConfig, register
from saeravel.saes.base import SAE
from saeravel.taskdata import data_source, token_batches

log = logging.getLogger(__name__)

TOKEN_LIMIT_PARAMS = ("max_tokens", "max_completion_tokens")
CHARS_PER_TOKEN = 4  # rough size of an English BPE token, for the cost estimate only
NEWLINE_MARK = "\u21b5"

Messages = list[dict[str, str]]


@dataclass
class JudgeConfig:
    """The LLM judge: an OpenAI-compatible chat-completions endpoint."""

    model: str = "gpt-4o-mini"
    base_url: str | None = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float | None = 0.0
    token_limit_param: str = "max_tokens"
    max_retries: int = 3
    timeout_s: float = 60.0
    max_concurrency: int = 8
    cache: bool = True

    def __post_init__(self) -> None:
        check_judge(self)


def check_judge(jcfg: Any) -> None:
    """One-line errors for judge settings that cannot work (run when the config is built)."""
    if not jcfg.model:
        raise UserError("eval.judge.model is empty; name the judge model (e.g. gpt-4o-mini)")
    if not jcfg.base_url:
        raise UserError(
            "eval.judge.base_url is empty; give an OpenAI-compatible endpoint such as "
            "https://api.openai.com/v1 or http://localhost:8000/v1"
        )
    if jcfg.token_limit_param not in TOKEN_LIMIT_PARAMS:
        raise UserError(
            f"eval.judge.token_limit_param={jcfg.token_limit_param!r}; valid: "
            + ", ".join(TOKEN_LIMIT_PARAMS)
        )
    if jcfg.max_retries < 0:
        raise UserError(f"eval.judge.max_retries must be >= 0 (got {jcfg.max_retries})")
    if jcfg.max_concurrency < 1:
        raise UserError(f"eval.judge.max_concurrency must be >= 1 (got {jcfg.max_concurrency})")


def judge_key(jcfg: Any) -> str:
    """The judge's API key from ``judge.api_key_env``; a one-line error when it is unset.
    Every run builds its judge with the key (cached answers or not), so the pipeline checks it
    before anything loads (the eval's ``validate``)."""
    key = os.environ.get(jcfg.api_key_env, "").strip() if jcfg.api_key_env else ""
    if not key:
        raise UserError(
            f"eval=autointerp needs an API key for the judge at {jcfg.base_url}: set the "
            f"environment variable {jcfg.api_key_env or 'OPENAI_API_KEY'} (any non-empty "
            "value for a local server without auth; eval.judge.api_key_env names another "
            "variable)"
        )
    return key


def validate(cfg: Any, job: Any = None) -> None:
    """What the values alone cannot say, before anything loads: the judge's API key."""
    judge_key(cfg.judge)


@dataclass
class AutoInterpEvalConfig(TextSourceConfig):
    """SAEBench's autointerp (see the module docstring)."""

    name: str = "autointerp"
    version: str = "1.0"
    dataset: str = "monology/pile-uncopyrighted"
    total_tokens: int = 2_000_000
    batch_size: int = 32
    prepend_bos: bool = True
    facts_per_sequence: int = 6
    n_latents: int = 1000
    override_latents: list[int] | None = None
    dead_latent_threshold: int = 15
    buffer: int = 10
    no_overlap: bool = True
    act_threshold_frac: float = 0.01
    n_top_ex_for_generation: int = 10
    n_iw_sampled_ex_for_generation: int = 5
    n_top_ex_for_scoring: int = 2
    n_iw_sampled_ex_for_scoring: int = 2
    n_random_ex_for_scoring: int = 10
    max_tokens_in_explanation: int = 30
    max_tokens_in_prediction: int | None = None
    use_demos_in_explanation: bool = True
    save_windows: bool = True
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    seed: int = 42

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(self)


# ----------------------------------------------------------------------------- activations


TEXT_KEYS = (
    "text_source", "dataset", "dataset_config", "data_files", "split", "text_column",
    "streaming", "shuffle_buffer", "context_size", "prepend_bos", "facts_per_sequence", "seed",
)  # fmt: skip


def collect_tokens(cfg: Any, ctx: EvalContext, n_rows: int) -> torch.Tensor:
    """``n_rows`` rows of text tokens [n_rows, width] (embedded rows right-padded), read
    as ``eval=core`` reads its text."""
    text_cfg = SimpleNamespace(**{k: getattr(cfg, k) for k in TEXT_KEYS})
    text_cfg.batch_size_prompts = cfg.batch_size
    rows: list[torch.Tensor] = []
    got = 0
    for batch in token_batches(text_cfg, ctx.model, -(-n_rows // cfg.batch_size)):
        rows.append(batch.cpu())
        got += batch.shape[0]
        if got >= n_rows:
            break
    if not rows:
        raise UserError("the text stream is empty: no row of tokens to evaluate on")
    tok = ctx.model.tokenizer
    pad = next((i for i in (tok.pad_token_id, tok.bos_token_id) if i is not None), 0)
    out = torch.full((got, max(r.shape[1] for r in rows)), pad, dtype=torch.long)
    start = 0
    for r in rows:
        out[start : start + r.shape[0], : r.shape[1]] = r
        start += r.shape[0]
    if got < n_rows:
        log.warning("text ran out: %d rows instead of %d", got, n_rows)
    return out[:n_rows]


@dataclass
class SparseActivations:
    """Nonzero activations of some latents over a token grid, grouped by latent and
    densified one latent at a time."""

    shape: tuple[int, int]
    latents: list[int]
    flat: torch.Tensor  # index into the flattened grid, grouped by latent
    values: torch.Tensor
    offsets: list[int]  # entries of latents[i] are flat[offsets[i] : offsets[i + 1]]

    def dense(self, latent: int) -> torch.Tensor:
        """Activations [rows, width] of ``latent`` (0 where inactive or special)."""
        i = self.latents.index(latent)
        lo, hi = self.offsets[i], self.offsets[i + 1]
        out = torch.zeros(self.shape[0] * self.shape[1])
        out[self.flat[lo:hi]] = self.values[lo:hi]
        return out.view(self.shape)


@torch.no_grad()
def selected_activations(
    model: Any,
    sae: SAE,
    hook_name: str,
    tokens: torch.Tensor,
    latents: Sequence[int],
    special_ids: Sequence[int],
    batch_size: int,
) -> SparseActivations:
    """Activations of ``latents`` on ``tokens`` [rows, width]; only nonzero entries are
    kept, so memory follows activity, not rows x width x latents."""
    device = model.cfg.device
    sel = torch.tensor(list(latents), dtype=torch.long)
    width = tokens.shape[1]
    flat, cols, vals = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)], []
    for start in tqdm(
        range(0, tokens.shape[0], batch_size), desc="latent activations", leave=False
    ):
        toks = tokens[start : start + batch_size].to(device)
        mask = counted_mask(toks, special_ids)
        f = encode_latents(sae, hook_activations(model, hook_name, toks))
        f = f[..., sel.to(f.device)].float() * mask[..., None]
        b, p, j = (f > 0).nonzero(as_tuple=True)
        flat.append(((b + start) * width + p).cpu())
        cols.append(j.cpu())
        vals.append(f[b, p, j].cpu())
    all_cols = torch.cat(cols)
    order = all_cols.argsort(stable=True)
    counts = torch.bincount(all_cols, minlength=len(latents)).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return SparseActivations(
        shape=(tokens.shape[0], width),
        latents=[int(j) for j in latents],
        flat=torch.cat(flat)[order],
        values=(torch.cat(vals) if vals else torch.zeros(0))[order],
        offsets=offsets,
    )


# ----------------------------------------------------------------------------- windows


def window_bounds(pos: int, width: int, buffer: int) -> tuple[int, int]:
    """``[lo, hi)`` of the window around ``pos``, cut at the row's ends."""
    return max(0, pos - buffer), min(width, pos + buffer + 1)


def top_centres(
    acts: torch.Tensor, k: int, buffer: int, no_overlap: bool = True
) -> list[tuple[int, int]]:
    """Up to ``k`` (row, pos) with the largest positive activations, largest first; with
    ``no_overlap`` a centre within ``buffer`` of a chosen one in the same row is skipped."""
    flat = acts.flatten()
    positive = (flat > 0).nonzero(as_tuple=True)[0]
    order = positive[flat[positive].argsort(descending=True, stable=True)]
    width = acts.shape[1]
    chosen: list[tuple[int, int]] = []
    for idx in order.tolist():
        row, pos = divmod(idx, width)
        if no_overlap and any(r == row and abs(p - pos) <= buffer for r, p in chosen):
            continue
        chosen.append((row, pos))
        if len(chosen) == k:
            break
    return chosen


def importance_sampled_centres(
    acts: torch.Tensor, k: int, low: float, high: float, gen: torch.Generator
) -> list[tuple[int, int]]:
    """Up to ``k`` (row, pos) drawn without replacement with probability proportional to the
    squared activation, among activations strictly between ``low`` and ``high``."""
    flat = acts.flatten()
    cand = ((flat > low) & (flat < high)).nonzero(as_tuple=True)[0]
    if k <= 0 or len(cand) == 0:
        return []
    weights = flat[cand].double().pow(2)
    picks = torch.multinomial(weights, min(k, len(cand)), replacement=False, generator=gen)
    width = acts.shape[1]
    return [divmod(int(i), width) for i in cand[picks].tolist()]


def random_quiet_centres(
    acts: torch.Tensor,
    counted: torch.Tensor,
    k: int,
    buffer: int,
    threshold: float,
    gen: torch.Generator,
) -> list[tuple[int, int]]:
    """Up to ``k`` counted (row, pos) drawn uniformly among those whose whole window has no
    activation above ``threshold``."""
    if k <= 0:
        return []
    window_max = torch.nn.functional.max_pool1d(
        acts[:, None, :], kernel_size=2 * buffer + 1, stride=1, padding=buffer
    )[:, 0, :]
    cand = (counted & (window_max <= threshold)).flatten().nonzero(as_tuple=True)[0]
    if len(cand) == 0:
        return []
    picks = torch.randperm(len(cand), generator=gen)[:k]
    width = acts.shape[1]
    return [divmod(int(i), width) for i in cand[picks].tolist()]


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text of each token as it appears in the decoded sequence (with its spacing)."""
    pieces: list[str] = []
    prev = ""
    for i in range(len(ids)):
        cur = tokenizer.decode(list(ids[: i + 1]))
        pieces.append(cur[len(prev) :] if cur.startswith(prev) else tokenizer.decode([ids[i]]))
        prev = cur
    return pieces


def render_window(
    pieces: Sequence[str], acts: Sequence[float], threshold: float, mark: bool
) -> str:
    """Join token ``pieces``; with ``mark``, tokens with activation above ``threshold`` are
    wrapped as ``<<token>>`` (leading spaces stay outside). Newlines are shown as a mark."""
    out = []
    for piece, act in zip(pieces, acts, strict=True):
        piece = piece.replace("\ufffd", "").replace("\r", "").replace("\n", NEWLINE_MARK)
        if mark and act > threshold:
            body = piece.lstrip()
            piece = piece[: len(piece) - len(body)] + f"<<{body}>>"
        out.append(piece)
    return "".join(out).strip()


@dataclass
class Window:
    """One text window shown to the judge."""

    kind: str  # top | iw | random
    row: int
    pos: int
    text: str
    marked: str
    active: bool
    max_act: float


def make_window(
    kind: str,
    row: int,
    pos: int,
    tokens: torch.Tensor,
    acts: torch.Tensor,
    counted: torch.Tensor,
    buffer: int,
    threshold: float,
    tokenizer: Any,
) -> Window:
    """The window around (row, pos), rendered plain and marked, with its activity."""
    lo, hi = window_bounds(pos, tokens.shape[1], buffer)
    keep = counted[row, lo:hi]
    ids = tokens[row, lo:hi][keep].tolist()
    vals = acts[row, lo:hi][keep].tolist()
    pieces = token_pieces(tokenizer, ids)
    top = max(vals, default=0.0)
    return Window(
        kind=kind,
        row=row,
        pos=pos,
        text=render_window(pieces, vals, threshold, mark=False),
        marked=render_window(pieces, vals, threshold, mark=True),
        active=top > threshold,
        max_act=float(top),
    )


@dataclass
class LatentExamples:
    """Everything the judge sees for one latent, or why the latent cannot be judged."""

    latent: int
    n_activations: int
    explanation_windows: list[Window] = field(default_factory=list)
    scoring_windows: list[Window] = field(default_factory=list)
    example_answer: str = ""
    skip_reason: str | None = None


def latent_examples(
    latent: int,
    acts: torch.Tensor,
    tokens: torch.Tensor,
    counted: torch.Tensor,
    cfg: Any,
    tokenizer: Any,
    seed: int,
) -> LatentExamples:
    """Explanation and (shuffled) scoring windows of one latent."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_act = int((acts > 0).sum())
    ex = LatentExamples(latent=latent, n_activations=n_act)
    n_top = cfg.n_top_ex_for_generation + cfg.n_top_ex_for_scoring
    top = top_centres(acts, n_top, cfg.buffer, cfg.no_overlap)
    if len(top) < n_top:
        ex.skip_reason = (
            f"only {len(top)} separate activating windows (needs {n_top}); "
            "use more text (eval.total_tokens) or a smaller eval.buffer"
        )
        return ex
    max_act = float(acts[top[0]])
    threshold = cfg.act_threshold_frac * max_act
    top_min = min(float(acts[c]) for c in top)
    n_iw = cfg.n_iw_sampled_ex_for_generation + cfg.n_iw_sampled_ex_for_scoring
    iw = importance_sampled_centres(acts, n_iw, threshold, top_min, gen)
    quiet = random_quiet_centres(
        acts, counted, cfg.n_random_ex_for_scoring, cfg.buffer, threshold, gen
    )

    def build(kind: str, centres: Iterable[tuple[int, int]]) -> list[Window]:
        return [
            make_window(kind, r, p, tokens, acts, counted, cfg.buffer, threshold, tokenizer)
            for r, p in centres
        ]

    rng.shuffle(top)
    rng.shuffle(iw)
    n_gen_iw = min(cfg.n_iw_sampled_ex_for_generation, len(iw))
    gen_windows = build("top", top[: cfg.n_top_ex_for_generation]) + build("iw", iw[:n_gen_iw])
    gen_windows.sort(key=lambda w: -w.max_act)
    scoring = (
        build("top", top[cfg.n_top_ex_for_generation :])
        + build("iw", iw[n_gen_iw:])
        + build("random", quiet)
    )
    rng.shuffle(scoring)
    ex.explanation_windows = gen_windows
    ex.scoring_windows = scoring
    n_pos = sum(w.active for w in scoring)
    example = sorted(rng.sample(range(1, len(scoring) + 1), k=max(1, min(n_pos, len(scoring)))))
    ex.example_answer = ", ".join(map(str, example))
    return ex


# ----------------------------------------------------------------------------- prompts


EXPLAIN_SYSTEM = (
    "You are helping to interpret one latent of a sparse autoencoder trained on the internal "
    "activations of a language model. You will see short text excerpts on which the latent is "
    "active; every token on which it is active is wrapped in << and >>. The excerpts are "
    "ordered from the strongest activation to the weakest. Describe in one short sentence "
    "(at most 20 words, no lists, no formatting) what the latent responds to. Prefer a "
    "general description that covers most marked tokens over one that fits a single excerpt; "
    "mention capitalisation or punctuation only if it matters. Begin your answer with "
    '"The latent fires on".'
)
EXPLAIN_DEMOS = (
    " Examples of the expected form: \"The latent fires on the word 'because' opening a "
    'clause", "The latent fires on names of chemical elements", "The latent fires on '
    'closing brackets in source code", "The latent fires on text about weather forecasts".'
)
SCORE_SYSTEM = (
    "You are testing an explanation of one latent of a sparse autoencoder trained on the "
    "internal activations of a language model. You will get the explanation and {n} numbered "
    "text excerpts in random order. Using the explanation, decide on which excerpts the latent "
    "is active on at least one token. Answer only with the numbers of those excerpts, "
    'separated by commas (for example "{example}"), or with the single word "None" if you '
    "think it is active on none of them. Do not write anything else."
)


def explanation_messages(windows: Sequence[Window], demos: bool) -> Messages:
    """Chat messages asking the judge to explain a latent from its marked windows."""
    system = EXPLAIN_SYSTEM + (EXPLAIN_DEMOS if demos else "")
    body = "\n".join(f"{i}. {w.marked}" for i, w in enumerate(windows, 1))
    user = f"Excerpts on which the latent is active:\n\n{body}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def scoring_messages(explanation: str, windows: Sequence[Window], example: str) -> Messages:
    """Chat messages asking the judge which of the (unmarked) windows activate."""
    system = SCORE_SYSTEM.format(n=len(windows), example=example)
    body = "\n".join(f"{i}. {w.text}" for i, w in enumerate(windows, 1))
    user = f"Explanation: the latent fires on {explanation}\n\nExcerpts:\n\n{body}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


class MalformedAnswer(ValueError):
    """The judge's answer cannot be read."""


_EXPLANATION_PREFIX = re.compile(
    r"^(?:the|this)\s+(?:latent|neuron|feature)\s+(?:mostly\s+|primarily\s+)?"
    r"(?:fires|activates|responds|is\s+active)\s+(?:on|to|for)\s*",
    re.IGNORECASE,
)


def parse_explanation(text: str | None) -> str:
    """The explanation without its "The latent fires on" preamble (first non-empty line)."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    if not lines:
        raise MalformedAnswer("empty explanation")
    expl = lines[0].strip("`*\"' ")
    expl = _EXPLANATION_PREFIX.sub("", expl).rstrip(". ").strip()
    if not expl:
        raise MalformedAnswer(f"no explanation in {lines[0][:80]!r}")
    return expl


_NONE_ANSWER = re.compile(r"(?:none|no excerpts?|no examples?|\[\s*\]|)", re.IGNORECASE)
_NUMBER = re.compile(r"#?(\d+)")


def parse_predictions(text: str | None, n: int) -> list[int]:
    """The 1-based window numbers the judge predicts as active (sorted, unique)."""
    raw = (text or "").strip()
    s = raw.strip("`*\"' \n").rstrip(".").strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1].strip()
    if not raw:
        raise MalformedAnswer("empty answer")
    if _NONE_ANSWER.fullmatch(s):
        return []
    parts = [p for p in re.split(r"[,;\s]+|\band\b", s) if p]
    out = set()
    for part in parts:
        m = _NUMBER.fullmatch(part.rstrip("."))
        if m is None:
            raise MalformedAnswer(f"not a list of excerpt numbers: {raw[:80]!r}")
        k = int(m.group(1))
        if not 1 <= k <= n:
            raise MalformedAnswer(f"excerpt {k} does not exist (1..{n}): {raw[:80]!r}")
        out.add(k)
    return sorted(out)


def score_predictions(predicted: Iterable[int], active: Sequence[bool]) -> float:
    """Fraction of windows classified correctly (1-based ``predicted``)."""
    pred = set(predicted)
    if not active:
        return math.nan
    return sum((i in pred) == a for i, a in enumerate(active, 1)) / len(active)


def estimate_tokens(messages: Messages) -> int:
    """A rough token count of ``messages`` (characters / 4)."""
    return sum(-(-len(m["content"]) // CHARS_PER_TOKEN) + 4 for m in messages)


# ----------------------------------------------------------------------------- judge


class JudgeError(RuntimeError):
    """A request failed for this latent only (after the client's retries)."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


class Judge:
    """A chat-completions client with an on-disk answer cache."""

    def __init__(self, jcfg: Any, cache_dir: Path | None) -> None:
        check_judge(jcfg)
        key = judge_key(jcfg)
        from openai import OpenAI

        self.cfg = jcfg
        self.client = OpenAI(
            api_key=key,
            base_url=jcfg.base_url,
            max_retries=jcfg.max_retries,
            timeout=jcfg.timeout_s,
        )
        self.cache_dir = Path(cache_dir) if cache_dir is not None and jcfg.cache else None
        self.n_requests = 0
        self.n_cached = 0
        self._lock = threading.Lock()

    def _params(self, max_tokens: int) -> dict[str, Any]:
        params: dict[str, Any] = {self.cfg.token_limit_param: max_tokens}
        if self.cfg.temperature is not None:
            params["temperature"] = self.cfg.temperature
        return params

    def cache_key(self, messages: Messages, max_tokens: int) -> str:
        """Hash of the model, the messages and the generation parameters."""
        blob = json.dumps(
            {"model": self.cfg.model, "messages": messages, **self._params(max_tokens)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_path(self, messages: Messages, max_tokens: int) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.cache_key(messages, max_tokens)}.json"

    def cached(self, messages: Messages, max_tokens: int) -> str | None:
        """The cached answer to these messages, if any."""
        path = self._cache_path(messages, max_tokens)
        if path is None or not path.exists():
            return None
        try:
            return json.loads(path.read_text())["answer"]
        except (OSError, ValueError, KeyError):
            return None

    def complete(self, messages: Messages, max_tokens: int) -> str:
        """The judge's answer (cached). Endpoint-wide failures raise :class:`UserError`,
        failures of this request :class:`JudgeError`."""
        hit = self.cached(messages, max_tokens)
        if hit is not None:
            with self._lock:
                self.n_cached += 1
            return hit
        import openai

        where = f"judge endpoint {self.cfg.base_url}"
        resumable = "answers received so far are cached; rerunning resumes"
        try:
            resp = self.client.chat.completions.create(
                model=self.cfg.model, messages=messages, **self._params(max_tokens)
            )
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise UserError(
                f"{where} refused the key in ${self.cfg.api_key_env} (HTTP {exc.status_code}: "
                f"{_first_line(exc)}); {resumable}"
            ) from exc
        except openai.NotFoundError as exc:
            raise UserError(
                f"{where} has no model {self.cfg.model!r} or no /chat/completions route "
                f"(HTTP 404); check eval.judge.model and eval.judge.base_url; {resumable}"
            ) from exc
        except openai.APIConnectionError as exc:
            raise UserError(
                f"cannot reach {where} after {self.cfg.max_retries} retries "
                f"({type(exc).__name__}: {_first_line(exc)}); check eval.judge.base_url, or "
                f"raise eval.judge.timeout_s; {resumable}"
            ) from exc
        except openai.APIStatusError as exc:
            raise JudgeError(
                f"HTTP {exc.status_code} from the judge after {self.cfg.max_retries} retries: "
                f"{_first_line(exc)}"
            ) from exc
        except openai.OpenAIError as exc:
            raise JudgeError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
        with self._lock:
            self.n_requests += 1
        choices = getattr(resp, "choices", None) or []
        content = choices[0].message.content if choices else None
        if content is None:
            raise JudgeError("the judge's response has no message content")
        path = self._cache_path(messages, max_tokens)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            record = {"model": self.cfg.model, "messages": messages, "answer": content}
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        return content


# ----------------------------------------------------------------------------- the eval


def prediction_budget(cfg: Any, n_windows: int) -> int:
    """Completion tokens allowed for the list of predicted windows."""
    if cfg.max_tokens_in_prediction:
        return int(cfg.max_tokens_in_prediction)
    return 4 * n_windows + 10


def interpret_latent(judge: Judge, ex: LatentExamples, cfg: Any) -> dict[str, Any]:
    """Ask the judge to explain and then score one latent; never raises for a bad answer."""
    rec: dict[str, Any] = {
        "latent": ex.latent,
        "n_activations": ex.n_activations,
        "explanation": None,
        "predictions": None,
        "correct_seqs": [i for i, w in enumerate(ex.scoring_windows, 1) if w.active],
        "score": math.nan,
        "error": ex.skip_reason,
    }
    if cfg.save_windows:
        rec["explanation_windows"] = [w.marked for w in ex.explanation_windows]
        rec["scoring_windows"] = [
            {"text": w.text, "kind": w.kind, "active": w.active, "max_act": w.max_act}
            for w in ex.scoring_windows
        ]
    if ex.skip_reason is not None:
        return rec
    stage = "explanation"
    try:
        msgs = explanation_messages(ex.explanation_windows, cfg.use_demos_in_explanation)
        answer = judge.complete(msgs, cfg.max_tokens_in_explanation)
        rec["explanation"] = parse_explanation(answer)
        stage = "scoring"
        msgs = scoring_messages(rec["explanation"], ex.scoring_windows, ex.example_answer)
        answer = judge.complete(msgs, prediction_budget(cfg, len(ex.scoring_windows)))
        rec["raw_predictions"] = answer
        rec["predictions"] = parse_predictions(answer, len(ex.scoring_windows))
    except (MalformedAnswer, JudgeError) as exc:
        rec["error"] = f"{stage}: {exc}"
        return rec
    rec["score"] = score_predictions(rec["predictions"], [w.active for w in ex.scoring_windows])
    return rec


def choose_latents(
    cfg: Any, counts: torch.Tensor | None, d_sae: int
) -> tuple[list[int], dict[str, Any]]:
    """``override_latents``, else ``n_latents`` alive latents drawn with ``cfg.seed``."""
    if cfg.override_latents:
        bad = [i for i in cfg.override_latents if not 0 <= i < d_sae]
        if bad:
            raise UserError(f"eval.override_latents has {bad}, outside 0..{d_sae - 1}")
        return sorted(set(int(i) for i in cfg.override_latents)), {}
    assert counts is not None
    alive = (counts > cfg.dead_latent_threshold).nonzero(as_tuple=True)[0].tolist()
    info = {"n_alive": len(alive), "n_dead": d_sae - len(alive)}
    if not alive:
        raise UserError(
            f"no latent is active on more than eval.dead_latent_threshold="
            f"{cfg.dead_latent_threshold} tokens; use more text (eval.total_tokens) or lower it"
        )
    if len(alive) <= cfg.n_latents:
        if len(alive) < cfg.n_latents:
            log.warning(
                "only %d alive latents (asked for %d); using all", len(alive), cfg.n_latents
            )
        return alive, info
    return sorted(random.Random(cfg.seed).sample(alive, cfg.n_latents)), info


def check_config(cfg: Any) -> None:
    """One-line errors for values that cannot work."""
    positive = {
        "n_latents": cfg.n_latents,
        "context_size": cfg.context_size,
        "total_tokens": cfg.total_tokens,
        "batch_size": cfg.batch_size,
        "n_top_ex_for_generation": cfg.n_top_ex_for_generation,
        "n_top_ex_for_scoring": cfg.n_top_ex_for_scoring,
        "max_tokens_in_explanation": cfg.max_tokens_in_explanation,
    }
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"eval.{key} must be >= 1 (got {value})")
    non_negative = {
        "buffer": cfg.buffer,
        "n_iw_sampled_ex_for_generation": cfg.n_iw_sampled_ex_for_generation,
        "n_iw_sampled_ex_for_scoring": cfg.n_iw_sampled_ex_for_scoring,
        "n_random_ex_for_scoring": cfg.n_random_ex_for_scoring,
        "dead_latent_threshold": cfg.dead_latent_threshold,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UserError(f"eval.{key} must be >= 0 (got {value})")
    if not 0 <= cfg.act_threshold_frac < 1:
        raise UserError(f"eval.act_threshold_frac must be in [0, 1) (got {cfg.act_threshold_frac})")
    if cfg.override_latents is not None and any(i < 0 for i in cfg.override_latents):
        raise UserError(f"eval.override_latents has {min(cfg.override_latents)}; latents are >= 0")
    check_judge(cfg.judge)


def summarize(metrics: dict) -> str:
    """One line of the headline numbers."""
    m = metrics.get("autointerp", {})
    return (
        f"autointerp: score {m.get('autointerp_score', math.nan):.4f} "
        f"(std {m.get('autointerp_std_dev', math.nan):.4f})"
    )


def _mean_std(scores: Sequence[float]) -> tuple[float, float]:
    if not scores:
        return math.nan, math.nan
    t = torch.tensor(scores, dtype=torch.float64)
    std = t.std().item() if len(scores) > 1 else math.nan
    return t.mean().item(), std


@register(
    "autointerp",
    schema=AutoInterpEvalConfig,
    summarize=summarize,
    validate=validate,
    headline_metrics=("autointerp.autointerp_score", "autointerp.autointerp_std_dev"),
    plotted=(("autointerp.autointerp_score", "autointerp score"),),
    non_result_paths={
        "batch_size": "rows per forward pass when collecting activations",
        "judge.api_key_env": "which environment variable holds the judge's API key",
        "judge.max_concurrency": "judge requests in flight at once",
    },
    saebench_required={"autointerp": ("autointerp_score", "autointerp_std_dev")},
    saebench_headline="autointerp",
)
def run(cfg: Any, ctx: EvalContext) -> EvalOutput:
    """Run autointerp on the job's model, SAE and layer."""
    if ctx.sae is None:
        raise UserError("eval=autointerp needs an SAE; choose one with sae=... (not sae=none)")
    check_config(cfg)
    judge = Judge(cfg.judge, ctx.cache_dir / "autointerp")
    lm, sae = ctx.model, ctx.sae
    if lm.tokenizer is None:
        raise UserError(f"model {lm.name} has no tokenizer; eval=autointerp needs one")
    source = data_source(cfg.text_source, lm, key="eval.text_source")
    special = special_token_ids(lm.tokenizer)
    n_rows = max(1, cfg.total_tokens // cfg.context_size)
    tokens = collect_tokens(cfg, ctx, n_rows)
    counted = counted_mask(tokens, special)
    log.info(
        "autointerp on %s text: %d rows x %d tokens (%d counted)",
        source, tokens.shape[0], tokens.shape[1], int(counted.sum()),
    )  # fmt: skip
    model = lm.model
    counts = None
    if not cfg.override_latents:
        batches = (tokens[i : i + cfg.batch_size] for i in range(0, len(tokens), cfg.batch_size))
        counts, _ = latent_firing_counts(
            model, sae, ctx.hook_name, batches, special, total=-(-len(tokens) // cfg.batch_size)
        )
    latents, alive_info = choose_latents(cfg, counts, sae.d_sae)
    acts = selected_activations(model, sae, ctx.hook_name, tokens, latents, special, cfg.batch_size)
    examples = [
        latent_examples(
            j, acts.dense(j), tokens, counted, cfg, lm.tokenizer, cfg.seed * 1_000_003 + j
        )
        for j in tqdm(latents, desc="autointerp windows", leave=False)
    ]
    _log_plan(judge, examples, cfg)
    records = _judge_all(judge, examples, cfg)
    scores = [r["score"] for r in records if not math.isnan(r["score"])]
    mean, std = _mean_std(scores)
    metrics = {"autointerp": {"autointerp_score": mean, "autointerp_std_dev": std}}
    failures = collections.Counter(
        (r["error"] or "").split(":")[0] for r in records if math.isnan(r["score"])
    )
    unstructured = {
        "text_source": source,
        "n_rows": int(tokens.shape[0]),
        "n_counted_tokens": int(counted.sum()),
        "latents": latents,
        **alive_info,
        "n_scored": len(scores),
        "n_failed": len(records) - len(scores),
        "failures_by_stage": dict(failures),
        "judge": {
            "model": cfg.judge.model,
            "base_url": cfg.judge.base_url,
            "requests": judge.n_requests,
            "cached_answers": judge.n_cached,
        },
    }
    summary = [
        summarize(metrics) + f" over {len(scores)}/{len(records)} latents; judge "
        f"{cfg.judge.model}: {judge.n_requests} requests, {judge.n_cached} cached answers"
    ]
    return EvalOutput(metrics, records, unstructured, summary)


def _log_plan(judge: Judge, examples: Sequence[LatentExamples], cfg: Any) -> None:
    """Log how many judge requests are needed and a rough token count, before any is made."""
    n_req = n_cached = prompt_tok = completion_tok = 0
    for ex in examples:
        if ex.skip_reason is not None:
            continue
        msgs = explanation_messages(ex.explanation_windows, cfg.use_demos_in_explanation)
        hit = judge.cached(msgs, cfg.max_tokens_in_explanation)
        expl = None
        if hit is None:
            n_req += 1
            prompt_tok += estimate_tokens(msgs)
            completion_tok += cfg.max_tokens_in_explanation
        else:
            n_cached += 1
            try:
                expl = parse_explanation(hit)
            except MalformedAnswer:
                continue  # no scoring request will follow
        budget = prediction_budget(cfg, len(ex.scoring_windows))
        scoring = scoring_messages(expl or "", ex.scoring_windows, ex.example_answer)
        if expl is not None and judge.cached(scoring, budget) is not None:
            n_cached += 1
            continue
        n_req += 1
        prompt_tok += estimate_tokens(scoring) + (0 if expl else cfg.max_tokens_in_explanation)
        completion_tok += budget
    n_skip = sum(ex.skip_reason is not None for ex in examples)
    log.info(
        "autointerp: %d latents (%d without enough windows) -> %d judge requests to %s at %s "
        "(%d answers cached), about %d prompt tokens and at most %d completion tokens",
        len(examples), n_skip, n_req, cfg.judge.model, cfg.judge.base_url, n_cached,
        prompt_tok, completion_tok,
    )  # fmt: skip


def _judge_all(judge: Judge, examples: Sequence[LatentExamples], cfg: Any) -> list[dict]:
    """Interpret every latent with up to ``judge.max_concurrency`` requests in flight."""
    records: dict[int, dict] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=cfg.judge.max_concurrency)
    try:
        futures = {pool.submit(interpret_latent, judge, ex, cfg): ex.latent for ex in examples}
        done = concurrent.futures.as_completed(futures)
        for fut in tqdm(done, total=len(futures), desc="autointerp judge", leave=False):
            records[futures[fut]] = fut.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [records[ex.latent] for ex in examples]
