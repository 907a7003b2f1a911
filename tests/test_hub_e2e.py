"""The real-model path end to end, offline, through the libraries' own ``from_pretrained``.

A temporary Hugging Face cache in the hub's layout (``models--<org>--<name>/blobs``,
``snapshots/<commit>/...`` symlinks, ``refs/main``) holds

* ``gpt2``: a tiny GPT-2 (3 blocks, width 64, GPT-2's real 50257-token vocabulary and BPE
  tokenizer, random weights), read by ``HookedTransformer.from_pretrained("gpt2")``;
* ``jbloom/GPT2-Small-SAEs-Reformatted``: an SAE for ``blocks.2.hook_resid_pre`` in Bloom's
  pre-6.0 sae_lens format (``cfg.json`` + ``sae_weights.safetensors`` + ``sparsity``), read
  by ``sae_lens.SAE.from_pretrained("gpt2-small-res-jb", "blocks.2.hook_resid_pre")``.

``run.py model=gpt2-small sae=jbloom layer=1`` then runs ``eval=core`` on a local JSON-lines
text file and ``eval=ravel`` on RAVEL-format files whose Country / Continent values are
*planted*: each city's value is the random model's own greedy answer (one token) to the
paper's 5-shot prompt, so the knowledge filter keeps cities and pairs exist.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from bpe import GPT2_VOCAB_SIZE, write_gpt2_tokenizer_files

from helpers import write_hub_repo

ROOT = Path(__file__).resolve().parents[1]
# ../shared/ravel from the project's root (from a worktree in wt/<name>: ../../shared/ravel)
RAVEL_FILES = next(
    (p / "shared" / "ravel" for p in ROOT.parents if (p / "shared" / "ravel").is_dir()),
    ROOT.parent / "shared" / "ravel",
)
# 3 blocks: blocks.2.hook_resid_pre (the SAE's hook for layer 1) exists only from 3 blocks on
N_LAYERS, D_MODEL, N_HEADS, N_CTX = 3, 64, 4, 256
D_SAE = 256
SAE_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"
SAE_FOLDER = "blocks.2.hook_resid_pre"  # gpt2-small-res-jb's path for layer 1
N_CITIES = 120  # candidates; those with a one-token answer to both prompts are kept


# ----------------------------------------------------------------------------- hub cache


def tiny_gpt2_files(tmp: Path, seed: int = 0) -> dict[str, bytes]:
    """config.json, model.safetensors, generation_config.json and the tokenizer files of a
    2-block GPT-2 with GPT-2's real vocabulary, as ``save_pretrained`` writes them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=N_CTX,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        bos_token_id=50256,
        eos_token_id=50256,
        # a larger init than GPT-2's 0.02, so the random model's answers depend on the city
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    out = tmp / "gpt2_save"
    model.save_pretrained(out, safe_serialization=True)
    # the real gpt2 config.json has n_ctx (transformer_lens reads it); transformers 5 drops it
    cfg_path = out / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["n_ctx"] = N_CTX
    cfg_path.write_text(json.dumps(cfg_json, indent=2))
    write_gpt2_tokenizer_files(out)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def jbloom_sae_files(seed: int = 0) -> dict[str, bytes]:
    """Bloom's layout for one SAE: ``<hook>/cfg.json`` (pre-6.0 sae_lens keys),
    ``<hook>/sae_weights.safetensors`` and ``<hook>/sparsity.safetensors``."""
    from safetensors.torch import save

    cfg = {
        "model_name": "gpt2-small",
        "hook_point": SAE_FOLDER,
        "hook_point_layer": 2,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False,
        "context_size": 128,
        "d_in": D_MODEL,
        "d_sae": D_SAE,
        "expansion_factor": D_SAE // D_MODEL,
        "dtype": "torch.float32",
        "device": "cpu",
        "seed": 42,
        "b_dec_init_method": "geometric_median",
        "l1_coefficient": 8e-05,
        "lr": 0.0004,
        "train_batch_size": 4096,
        "run_name": f"{D_SAE}-L1-8e-05-LR-0.0004-Tokens-3.000e+08",
    }
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.nn.functional.normalize(torch.randn(D_SAE, D_MODEL, generator=g), dim=-1)
    weights = {
        "W_enc": W_dec.T.contiguous() * 2.0,
        "b_enc": -0.5 * torch.rand(D_SAE, generator=g),
        "W_dec": W_dec.contiguous(),
        "b_dec": 0.01 * torch.randn(D_MODEL, generator=g),
    }
    sparsity = {"sparsity": torch.full((D_SAE,), -3.0)}
    return {
        f"{SAE_FOLDER}/cfg.json": json.dumps(cfg, indent=2).encode(),
        f"{SAE_FOLDER}/sae_weights.safetensors": save(weights),
        f"{SAE_FOLDER}/sparsity.safetensors": save(sparsity),
    }


def build_hub_cache(tmp: Path) -> Path:
    """An HF_HOME with ``hub/`` holding the tiny gpt2 and the jbloom SAE repo."""
    home = tmp / "hf_home"
    write_hub_repo(home / "hub", "gpt2", tiny_gpt2_files(tmp))
    write_hub_repo(home / "hub", SAE_REPO, jbloom_sae_files())
    return home


def hub_env(home: Path, tmp: Path) -> dict[str, str]:
    return dict(
        os.environ,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_DATASETS_CACHE=str(home / "datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        SAERAVEL_CACHE=str(tmp / "cache"),
        SAERAVEL_RESULTS=str(tmp / "results"),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    )


# ----------------------------------------------------------------------------- data


def write_text_file(path: Path, n_docs: int = 40) -> Path:
    """JSON lines of plain English text (eval.dataset=json eval.data_files=...)."""
    words = (
        "the city lies on a river and its people speak many languages while travellers "
        "arrive by train from the north and the south to see old churches markets and parks"
    ).split()
    lines = []
    for i in range(n_docs):
        doc = " ".join(words[(i * 7 + j) % len(words)] for j in range(40 + i % 13))
        lines.append(json.dumps({"text": doc.capitalize() + "."}))
    path.write_text("\n".join(lines) + "\n")
    return path


# the paper's 5-shot cities, which the eval keeps out of the entity pool
SHOT_CITIES = {"Toronto", "Beijing", "Miami", "Santiago", "London"}


@torch.no_grad()
def planted_labels(model: Any, template: str, cities: list[str]) -> list[str]:
    """Each city's planted value: the model's greedy next token after ``template`` when it is
    a space-led word that the tokenizer gives back as that one token (" 1988" -> "1988"), else
    ''. One generated token (the eval runs with ``eval.match_tokens=1``), so the first
    generated word, the first generated token and the generated prefix all equal the label,
    whatever matching rule the eval applies."""
    from saeravel.evals.ravel.prompts import bos_id, pad, tokenize_prompt

    tok = model.tokenizer
    prompts = [tokenize_prompt(tok, template, c, "planted", bos_id(model)) for c in cities]
    toks, last = pad(prompts, tok.pad_token_id or 0, model.cfg.device)
    nxt = model(toks)[torch.arange(len(prompts)), last].argmax(-1).tolist()
    labels = []
    for t in nxt:
        text = tok.decode([t])
        word = text[1:]
        ok = text.startswith(" ") and word.isalnum()
        ok = ok and tok(" " + word, add_special_tokens=False)["input_ids"] == [t]
        labels.append(word if ok else "")
    return labels


def write_planted_ravel(folder: Path, model: Any, attributes: list[str]) -> dict[str, Any]:
    """RAVEL's five city files for real RAVEL cities whose every attribute in ``attributes``
    got a planted value (:func:`planted_labels` on the saeravel protocol's 5-shot prompt).
    Returns how many cities were kept and how many distinct values each attribute has."""
    from saeravel.evals.ravel.prompts import PAPER_FEW_SHOT

    real = json.loads((RAVEL_FILES / "ravel_city_entity_attributes.json").read_text())
    pool = sorted(c for c in real if c.isascii() and c.isalpha() and c not in SHOT_CITIES)
    cities = pool[::10][:N_CITIES]
    values = {a: planted_labels(model, PAPER_FEW_SHOT[a], cities) for a in attributes}
    entities = {}
    for i, c in enumerate(cities):
        if all(values[a][i] for a in attributes):
            entities[c] = {**real[c], **{a: values[a][i] for a in attributes}}
    templates = json.loads((RAVEL_FILES / "ravel_city_attribute_to_prompts.json").read_text())
    template_split = json.loads((RAVEL_FILES / "ravel_city_prompt_to_split.json").read_text())
    entity_split = json.loads((RAVEL_FILES / "ravel_city_entity_to_split.json").read_text())
    wiki = json.loads((RAVEL_FILES / "wikipedia_city_entity_prompts.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "ravel_city_entity_attributes.json": entities,
        "ravel_city_attribute_to_prompts.json": templates,
        "ravel_city_prompt_to_split.json": template_split,
        "ravel_city_entity_to_split.json": {c: entity_split[c] for c in entities},
        "wikipedia_city_entity_prompts.json": {
            k: v for k, v in wiki.items() if v["entity"] in entities
        },
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data))
    return {a: len({entities[c][a] for c in entities}) for a in attributes} | {
        "n_entities": len(entities)
    }


def plant_main(folder: str) -> None:
    """``python tests/test_hub_e2e.py plant <folder>``: load the hub cache's gpt2 (from the
    environment's HF_HUB_CACHE, read at import) as the pipeline does and plant RAVEL data."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer.from_pretrained("gpt2", device="cpu")
    stats = write_planted_ravel(Path(folder), model, ["Country", "Continent"])
    print(json.dumps(stats))


# ----------------------------------------------------------------------------- the tests


def numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a nested dict, keyed by its path."""
    if isinstance(tree, dict):
        out: dict[str, float] = {}
        for k, v in tree.items():
            out.update(numbers(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not RAVEL_FILES.is_dir():
        pytest.skip(f"RAVEL's city files are not at {RAVEL_FILES}")
    tmp = tmp_path_factory.mktemp("hub_e2e")
    home = build_hub_cache(tmp)
    return {"tmp": tmp, "home": home, "env": hub_env(home, tmp)}


def run_job(hub: dict[str, Any], name: str, args: list[str], timeout: int = 1800) -> dict:
    out = hub["tmp"] / name
    proc = subprocess.run(
        [sys.executable, "run.py", f"hydra.run.dir={out}", "model=gpt2-small",
         f"model.n_layers={N_LAYERS}", f"model.d_model={D_MODEL}", "sae=jbloom", "layer=1",
         "device=cpu", *args],
        cwd=ROOT, env=hub["env"], capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    record = json.loads((out / "result.json").read_text())
    info = record["saeravel"]
    assert info["model_name"] == "gpt2-small" and info["layer"] == 1
    # Bloom's SAEs were trained on TL's default processing: centred writing weights
    assert info["model_info"]["processing"]["center_writing_weights"] is True
    ident = info["sae_identity"]
    assert (ident["release"], ident["sae_id"]) == ("gpt2-small-res-jb", SAE_FOLDER)
    assert ident["neuronpedia_id"] == "gpt2-small/2-res-jb"  # from sae_lens' directory
    assert (record["sae_lens_release_id"], record["sae_lens_id"]) == (
        "gpt2-small-res-jb",
        SAE_FOLDER,
    )
    assert (record["sae_cfg_dict"]["d_in"], record["sae_cfg_dict"]["d_sae"]) == (D_MODEL, D_SAE)
    assert record["sae_cfg_dict"]["hook_name"] == SAE_FOLDER
    metrics = numbers(record["eval_result_metrics"])
    assert metrics, record["eval_result_metrics"]
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, bad
    return record


def test_gpt2_bpe_tokenizer_is_gpt2s(gpt2_bpe_tokenizer: Any) -> None:
    """The fixture tokenises as GPT-2 does (ids from GPT-2's published vocabulary)."""
    tok = gpt2_bpe_tokenizer
    assert len(tok) == GPT2_VOCAB_SIZE and tok.eos_token_id == tok.bos_token_id == 50256
    ids = {s: tok(s, add_special_tokens=False)["input_ids"] for s in (" Canada.", "Hello world")}
    assert ids == {" Canada.": [3340, 13], "Hello world": [15496, 995]}
    assert tok.decode(tok(" North America")["input_ids"]) == " North America"


@pytest.mark.slow
def test_core_through_the_hub_cache(hub: dict[str, Any]) -> None:
    text = write_text_file(hub["tmp"] / "text.jsonl")
    record = run_job(
        hub,
        "core",
        ["eval=core", "eval.dataset=json", f"eval.data_files={text}", "eval.streaming=false",
         "eval.context_size=32", "eval.batch_size_prompts=4",
         "eval.n_eval_reconstruction_batches=2", "eval.n_eval_sparsity_variance_batches=2"],
    )  # fmt: skip
    m = record["eval_result_metrics"]
    assert m["token_stats"]["total_tokens_eval_reconstruction"] > 100
    assert 0 < m["sparsity"]["l0"] <= D_SAE
    assert m["model_performance_preservation"]["ce_loss_without_sae"] > 0


@pytest.mark.slow
def test_ravel_with_planted_knowledge_through_the_hub_cache(hub: dict[str, Any]) -> None:
    data = hub["tmp"] / "ravel_planted"
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "plant", str(data)],
        cwd=ROOT, env=hub["env"], capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    # the random model gives different cities different answers, so cause pairs exist
    assert stats["n_entities"] >= 20 and stats["Country"] >= 3 and stats["Continent"] >= 3
    record = run_job(
        hub,
        "ravel",
        ["eval=ravel", f"eval.data_dir={data}", "eval.match_tokens=1", "eval.epochs=1",
         "eval.max_pairs_per_split=16", "eval.batch_size=8"],
    )  # fmt: skip
    m = record["eval_result_metrics"]
    for attr in ("Country", "Continent"):
        none = m["baselines"]["none"][attr]
        assert none["n_cause"] > 0 and none["n_isolation"] > 0
        # the planted labels are the model's own answers: without an intervention every
        # isolation prompt is still answered as planted, no cause prompt changes its answer
        assert none["isolation"] == 1.0 and none["cause"] == 0.0
        for method in ("sae", "neurons", "das"):
            assert 0.0 <= m["ravel"][method][attr]["disentangle"] <= 1.0


if __name__ == "__main__":
    if sys.argv[1:2] == ["plant"]:
        plant_main(sys.argv[2])
