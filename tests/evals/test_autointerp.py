"""Tests of ``eval=autointerp`` against a real HTTP chat-completions server on 127.0.0.1.

The model is a tiny untrained 2-layer (d_model 64) transformer over the tiny city world whose
embeddings of four words carry a planted direction each; the SAE has one latent per planted
word (active exactly on that word) and two dead latents. The fake judge explains a latent by
the word it sees marked most often and predicts the windows containing that word, so the
score of every latent is known in advance.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from saeravel.errors import UserError
from saeravel.evals.api import EvalContext
from saeravel.evals.autointerp import (
    AutoInterpEvalConfig,
    JudgeConfig,
    MalformedAnswer,
    importance_sampled_centres,
    parse_explanation,
    parse_predictions,
    random_quiet_centres,
    render_window,
    run,
    score_predictions,
    top_centres,
)
from saeravel.models import LoadedModel
from saeravel.saes.base import SAE, SAEIdentity

from helpers import HOOK0, D

WORDS = ("continent", "country", "time", "language")  # latents 0..3; 4, 5 are dead
KEY_ENV = "SAERAVEL_TEST_JUDGE_KEY"
KEY = "test-key-123"


# ----------------------------------------------------------------------------- fake judge


class FakeJudge:
    """A chat-completions server: explains from the most often marked word, predicts the
    windows containing the explained word. ``country`` -> "None", ``time`` -> a malformed
    answer, ``http_error_word`` -> HTTP 400. Optionally fails the first request with 500."""

    def __init__(self, fail_first: bool = False, http_error_word: str | None = None) -> None:
        self.fail_first = fail_first
        self.http_error_word = http_error_word
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.bodies.append(body)
                    k = len(judge.bodies)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "no route"}})
                if self.headers.get("Authorization") != f"Bearer {KEY}":
                    return self._send(401, {"error": {"message": "bad key"}})
                if judge.fail_first and k == 1:
                    return self._send(500, {"error": {"message": "boom"}}, {"retry-after-ms": "5"})
                content = judge.answer(body["messages"])
                if content is None:
                    return self._send(400, {"error": {"message": "context too long"}})
                return self._send(200, completion(body["model"], content))

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, messages: list[dict]) -> str | None:
        user = messages[-1]["content"]
        marked = re.findall(r"<<(.*?)>>", user)
        if marked:
            word = collections.Counter(marked).most_common(1)[0][0]
            return f'The latent fires on the word "{word}".'
        word = re.search(r'"([^"]+)"', user.splitlines()[0]).group(1)
        if word == "country":
            return "None"
        if word == "time":
            return "I would say excerpts three and five"
        if word == self.http_error_word:
            return None
        lines = re.findall(r"^(\d+)\. (.*)$", user, re.MULTILINE)
        return ", ".join(i for i, text in lines if word in text.split())

    def __enter__(self) -> FakeJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def completion(model: str, content: str) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


# ----------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def planted(tiny_world):
    """(model, SAE): latent k is active exactly on WORDS[k]; latents 4 and 5 never are."""
    from saeravel.tiny_lm import build_model, build_tokenizer, world_vocabulary

    tok = build_tokenizer(world_vocabulary(tiny_world))
    arch = {"n_layers": 2, "d_model": D, "n_heads": 4, "d_mlp": 128, "n_ctx": 96, "local_layers": 1}
    torch.manual_seed(0)
    model = build_model(arch, tok)
    model.eval()
    g = torch.Generator().manual_seed(1)
    dirs = torch.linalg.qr(torch.randn(D, len(WORDS), generator=g))[0].T  # orthonormal rows
    with torch.no_grad():
        for k, word in enumerate(WORDS):
            model.W_E[tok.convert_tokens_to_ids(word)] += 10 * dirs[k]
    for p in model.parameters():
        p.requires_grad_(False)
    n = len(WORDS)
    W_enc = torch.zeros(D, n + 2)
    W_enc[:, :n] = dirs.T
    b_enc = torch.tensor([-5.0] * n + [-1.0, -1.0])
    W_dec = torch.zeros(n + 2, D)
    W_dec[:n] = dirs
    sae = SAE(W_enc, b_enc, W_dec, torch.zeros(D), hook_name=HOOK0, identity=SAEIdentity("t"))
    return LoadedModel(model=model, name="tiny-planted", world=tiny_world), sae


def small_cfg(url: str, **kw: Any) -> AutoInterpEvalConfig:
    judge = JudgeConfig(
        model="judge-test", base_url=url, api_key_env=KEY_ENV, max_concurrency=2, max_retries=2
    )
    base = dict(
        context_size=48,
        total_tokens=48 * 150,
        batch_size=32,
        n_latents=10,
        buffer=4,
        n_top_ex_for_generation=4,
        n_iw_sampled_ex_for_generation=2,
        n_top_ex_for_scoring=2,
        n_iw_sampled_ex_for_scoring=2,
        n_random_ex_for_scoring=6,
        judge=judge,
    )
    base.update(kw)
    return AutoInterpEvalConfig(**base)


def ctx_for(planted, tmp_path: Path) -> EvalContext:
    lm, sae = planted
    return EvalContext(lm, sae, 0, HOOK0, "cpu", 0, tmp_path, tmp_path)


# ----------------------------------------------------------------------------- end to end


def plan_line(caplog) -> str:
    lines = [r.getMessage() for r in caplog.records if "judge requests" in r.getMessage()]
    assert len(lines) == 1
    caplog.clear()
    return lines[0]


def test_end_to_end_scores_retry_and_cache(planted, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.INFO, logger="saeravel")
    with FakeJudge(fail_first=True) as judge:
        cfg = small_cfg(judge.url)
        out = run(cfg, ctx_for(planted, tmp_path))
        # The plan is logged before the first request: 4 latents x 2 requests.
        plan = plan_line(caplog)
        assert "-> 8 judge requests to judge-test" in plan and "(0 answers cached)" in plan
        assert re.search(r"about \d+ prompt tokens and at most \d+ completion tokens", plan)
        first = list(judge.bodies)

        # Dead latents 4 and 5 are never sampled.
        details = {d["latent"]: d for d in out.details}
        assert sorted(details) == [0, 1, 2, 3]
        assert out.unstructured["n_alive"] == 4 and out.unstructured["n_dead"] == 2

        # 4 latents x (explanation + scoring) = 8 answered requests, plus the 500 retried once:
        # the same body was sent twice.
        assert len(first) == 9
        counts = collections.Counter(json.dumps(b, sort_keys=True) for b in first)
        assert sorted(counts.values()) == [1] * 7 + [2]
        assert all(b["model"] == "judge-test" and b["temperature"] == 0.0 for b in first)
        assert all("max_tokens" in b for b in first)

        cont = details[0]
        assert cont["explanation"] == 'the word "continent"'
        assert cont["score"] == 1.0 and cont["error"] is None
        assert cont["predictions"] == cont["correct_seqs"]
        kinds = collections.Counter(w["kind"] for w in cont["scoring_windows"])
        assert kinds == {"top": 2, "iw": 2, "random": 6}
        for w in cont["scoring_windows"]:
            assert w["active"] == (w["kind"] != "random")
            assert ("continent" in w["text"].split()) == w["active"]
            assert "<<" not in w["text"]
        assert len(cont["explanation_windows"]) == 6
        assert all("<<continent>>" in w for w in cont["explanation_windows"])

        # "None" for all 10 windows: the 6 random ones are right, the 4 active ones wrong.
        country = details[1]
        assert country["predictions"] == [] and country["score"] == pytest.approx(0.6)
        assert len(country["correct_seqs"]) == 4

        # Malformed answers are NaN with the reason, not a crash.
        bad = details[2]
        assert math.isnan(bad["score"]) and bad["explanation"] == 'the word "time"'
        assert bad["error"].startswith("scoring: not a list of excerpt numbers")

        m = out.metrics["autointerp"]
        scores = [d["score"] for d in details.values() if not math.isnan(d["score"])]
        assert scores == [1.0, 0.6, 1.0]  # continent, country, language
        assert m["autointerp_score"] == pytest.approx(sum(scores) / 3)
        assert m["autointerp_std_dev"] == pytest.approx(torch.tensor(scores).std().item())
        assert out.unstructured["n_failed"] == 1

        # The rerun reads every answer from the cache: no request, same result.
        cached_files = list((tmp_path / "autointerp").glob("*.json"))
        assert len(cached_files) == 8
        out2 = run(cfg, ctx_for(planted, tmp_path))
        assert len(judge.bodies) == len(first)
        assert "-> 0 judge requests" in plan_line(caplog)
        assert out2.unstructured["judge"] == {
            "model": "judge-test",
            "base_url": judge.url,
            "requests": 0,
            "cached_answers": 8,
        }
        assert json.dumps(out2.details, sort_keys=True) == json.dumps(out.details, sort_keys=True)
        assert out2.metrics == out.metrics


def test_http_error_for_one_latent_is_nan_and_not_cached(planted, tmp_path, monkeypatch):
    """A non-retryable HTTP 400 on the scoring request of ``language`` -> NaN with reason."""
    monkeypatch.setenv(KEY_ENV, KEY)
    with FakeJudge(http_error_word="language") as judge:
        cfg = small_cfg(judge.url, override_latents=[3, 0])
        out = run(cfg, ctx_for(planted, tmp_path))
        details = {d["latent"]: d for d in out.details}
        assert math.isnan(details[3]["score"])
        assert details[3]["error"].startswith("scoring: HTTP 400")
        assert details[0]["score"] == 1.0
        assert out.metrics["autointerp"]["autointerp_score"] == 1.0
        assert math.isnan(out.metrics["autointerp"]["autointerp_std_dev"])  # one score
        n = len(judge.bodies)
        assert n == 4  # 400 is not retried
        run(cfg, ctx_for(planted, tmp_path))
        assert len(judge.bodies) == n + 1  # only the failed request is asked again


# ----------------------------------------------------------------------------- errors


def test_missing_key_is_a_one_line_error_before_any_compute(planted, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = small_cfg("http://127.0.0.1:9/v1")
    with pytest.raises(UserError, match=KEY_ENV) as err:
        run(cfg, ctx_for(planted, tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="base_url is empty"):
        run(small_cfg(""), ctx_for(planted, tmp_path))
    monkeypatch.setenv(KEY_ENV, KEY)
    cfg = small_cfg("http://x/v1")
    cfg.judge.model = ""
    with pytest.raises(UserError, match="judge.model is empty"):
        run(cfg, ctx_for(planted, tmp_path))


def test_wrong_key_and_unreachable_endpoint_stop_with_user_error(planted, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "wrong")
    with FakeJudge() as judge:
        with pytest.raises(UserError, match="refused the key") as err:
            run(small_cfg(judge.url, override_latents=[0]), ctx_for(planted, tmp_path))
        assert "\n" not in str(err.value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = small_cfg(f"http://127.0.0.1:{port}/v1", override_latents=[0])
    cfg.judge.max_retries = 0
    with pytest.raises(UserError, match="cannot reach judge endpoint"):
        run(cfg, ctx_for(planted, tmp_path))


def test_bad_config_values(planted, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(UserError, match="override_latents has \\[9\\]"):
        run(small_cfg("http://x/v1", override_latents=[0, 9]), ctx_for(planted, tmp_path))
    with pytest.raises(UserError, match="n_top_ex_for_scoring must be >= 1"):
        run(small_cfg("http://x/v1", n_top_ex_for_scoring=0), ctx_for(planted, tmp_path))
    with pytest.raises(UserError, match="no latent is active on more than"):
        run(small_cfg("http://x/v1", dead_latent_threshold=10**9), ctx_for(planted, tmp_path))
    lm, _ = planted
    ctx = EvalContext(lm, None, 0, HOOK0, "cpu", 0, tmp_path, tmp_path)
    with pytest.raises(UserError, match="needs an SAE"):
        run(small_cfg("http://x/v1"), ctx)


# ----------------------------------------------------------------------------- units


def test_top_centres_skip_overlapping_windows():
    acts = torch.tensor([[0.0, 5, 4, 0, 3, 0, 0, 2], [0, 0, 0, 0, 0, 0, 4.5, 0]])
    assert top_centres(acts, 10, buffer=1) == [(0, 1), (1, 6), (0, 4), (0, 7)]
    assert top_centres(acts, 3, buffer=1, no_overlap=False) == [(0, 1), (1, 6), (0, 2)]
    assert top_centres(acts, 10, buffer=3) == [(0, 1), (1, 6), (0, 7)]


def test_importance_sampling_stays_between_thresholds():
    acts = torch.tensor([[0.0, 0.01, 1.0, 2.0, 3.0, 9.0, 10.0]])
    g = torch.Generator().manual_seed(0)
    picks = importance_sampled_centres(acts, 10, low=0.05, high=9.0, gen=g)
    assert sorted(picks) == [(0, 2), (0, 3), (0, 4)]  # fewer than asked: all candidates
    # Squared weights: 3.0 is drawn first far more often than 1.0.
    firsts = collections.Counter(
        importance_sampled_centres(acts, 1, 0.05, 9.0, torch.Generator().manual_seed(s))[0]
        for s in range(300)
    )
    assert firsts[(0, 4)] > 3 * firsts[(0, 2)]


def test_random_windows_have_no_activation():
    acts = torch.zeros(3, 12)
    acts[0, 5] = 1.0
    acts[2, 0] = 0.5
    counted = torch.ones(3, 12, dtype=torch.bool)
    counted[:, 0] = False
    g = torch.Generator().manual_seed(0)
    picks = random_quiet_centres(acts, counted, 100, buffer=2, threshold=0.1, gen=g)
    assert len(picks) == len(set(picks))
    for r, p in picks:
        assert p != 0 and acts[r, max(0, p - 2) : p + 3].max() <= 0.1
    # Row 0 loses centres 3..7, row 2 loses 1..2 (and every row its special position 0).
    assert len(picks) == 3 * 11 - 5 - 2


def test_parse_predictions():
    assert parse_predictions("1, 3 and 5.", 6) == [1, 3, 5]
    assert parse_predictions(" None. ", 6) == []
    assert parse_predictions("none", 6) == []
    assert parse_predictions("[2, 4]", 6) == [2, 4]
    assert parse_predictions("#2 #4 4", 6) == [2, 4]
    assert parse_predictions('"3"', 6) == [3]
    for bad, reason in [
        ("maybe 3", "not a list"),
        ("7", "does not exist"),
        ("0", "does not exist"),
        ("", "empty"),
        (None, "empty"),
    ]:
        with pytest.raises(MalformedAnswer, match=reason):
            parse_predictions(bad, 6)


def test_parse_explanation():
    assert parse_explanation('The latent fires on the word "x".') == 'the word "x"'
    assert parse_explanation("This neuron activates on numbers\nmore") == "numbers"
    assert parse_explanation("  dates in tables. ") == "dates in tables"
    with pytest.raises(MalformedAnswer):
        parse_explanation("\n \n")
    with pytest.raises(MalformedAnswer):
        parse_explanation("The latent fires on.")


def test_score_is_fraction_classified_correctly():
    active = [True, False, False, True, False]
    assert score_predictions([1, 4], active) == 1.0
    assert score_predictions([], active) == 0.6
    assert score_predictions([1, 2, 3, 4, 5], active) == 0.4
    assert score_predictions([2], active) == 0.4


def test_render_marks_active_tokens_inside_their_spacing():
    pieces = ["Paris", " is", " in\nthe", " north"]
    assert render_window(pieces, [0.0, 2.0, 0.0, 0.5], 0.4, mark=True) == (
        "Paris <<is>> in\u21b5the <<north>>"
    )
    assert render_window(pieces, [0.0, 2.0, 0.0, 0.5], 0.4, mark=False) == (
        "Paris is in\u21b5the north"
    )
