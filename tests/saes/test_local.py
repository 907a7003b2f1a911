"""sae=local: saved sae_lens folders and OpenAI state dicts, their maths, and every problem of
the file as one line before the model loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from saes_helpers import (
    ATOL,
    D_IN,
    D_SAE,
    HOOK,
    K,
    assert_matches_sae_lens,
    custom,
    inputs,
    make_sae_lens,
    openai_state_dict,
    saved_sae_lens,
)

from saeravel.errors import UserError
from saeravel.saes.local import LocalSource
from saeravel.saes.none import NoSource
from saeravel.saes.source import check_known_width

# ----------------------------------------------------------------------------- local: sae_lens


@pytest.mark.filterwarnings(r"ignore:\s*This SAE has non-empty model_from_pretrained_kwargs")
def test_local_sae_lens_directory_round_trip(tmp_path: Path) -> None:
    theirs = make_sae_lens(
        "jumprelu", meta={"model_from_pretrained_kwargs": {"center_writing_weights": True}}
    )
    theirs.save_model(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {
        "cfg.json",
        "sae_weights.safetensors",
    }
    src = LocalSource(family="local", layer=3, path=str(tmp_path / "saved"))
    assert src.required_model_kwargs() == {"center_writing_weights": True}
    ours = src.load(None)
    assert ours.identity.path == str(tmp_path / "saved")
    assert ours.model_from_pretrained_kwargs == {"center_writing_weights": True}
    assert_matches_sae_lens(ours, theirs, inputs())

    wrong = LocalSource(family="local", layer=3, path=str(tmp_path / "saved"), hook_name="x")
    with pytest.raises(UserError, match="trained on blocks.3.hook_resid_post"):
        wrong.load(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a saved sae_lens SAE"):
        LocalSource(family="local", layer=3, path=str(tmp_path / "empty")).load(None)


# ----------------------------------------------------------------------------- local: OpenAI


def openai_reference(sd: dict[str, Any], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenAI's formula, written out independently of the library."""
    topk = sd["activation"] == "TopK"
    if topk:
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)  # unbiased
        x = (x - mu) / (std + 1e-5)
    pre = (x - sd["pre_bias"]) @ sd["encoder.weight"].T + sd["latent_bias"]
    if topk:
        vals, idx = pre.topk(K, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        latents = pre.relu()
    recons = latents @ sd["decoder.weight"].T + sd["pre_bias"]
    if topk:
        recons = recons * std + mu
    return latents, recons


@pytest.mark.parametrize("activation,flat", [("TopK", False), ("TopK", True), ("ReLU", False)])
def test_local_openai_state_dict(tmp_path: Path, activation: str, flat: bool) -> None:
    sd = openai_state_dict(activation, flat=flat)
    torch.save(sd, tmp_path / "v5_32k_layer_5.pt")
    src = LocalSource(
        family="local",
        layer=5,
        path=str(tmp_path / "v5_32k_layer_5.pt"),
        hook_name="blocks.5.hook_resid_post",
    )
    assert src.required_model_kwargs() == {"center_writing_weights": False}
    ours = src.load(None)
    assert ours.normalize_mode == ("layer_norm" if activation == "TopK" else "none")
    x = inputs(scale=0.5, shift=0.3)
    latents, recons = openai_reference(sd, x)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), latents, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.reconstruct(x), recons, atol=ATOL, rtol=0)
    assert (latents != 0).any()


def test_local_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        LocalSource(family="local", layer=5, path=str(tmp_path / "nope.pt")).load(None)
    torch.save(openai_state_dict("TopK"), tmp_path / "sae.pt")
    with pytest.raises(UserError, match="hook_name"):
        LocalSource(family="local", layer=5, path=str(tmp_path / "sae.pt")).load(None)
    with pytest.raises(UserError, match="unknown local SAE format"):
        LocalSource(family="local", layer=5, path=str(tmp_path / "sae.pt"), format="npz")
    bad = openai_state_dict("TopK")
    del bad["latent_bias"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="latent_bias"):
        LocalSource(family="local", layer=5, path=str(tmp_path / "bad.pt"), hook_name=HOOK).load(
            None
        )


# ----------------------------------------------------------------------------- bad SAE files


def bad_sae(tmp_path: Path, case: str) -> Path:
    """A file or folder with exactly one thing wrong with it."""
    import json

    from safetensors.torch import save_file

    folder = tmp_path / case
    if case == "missing":
        return tmp_path / "no_such_sae"
    if case in ("cfg_not_json", "cfg_no_d_sae", "weights_truncated", "weights_text",
                "weights_wrong_shape", "weights_missing_key", "cfg_list", "arch_gated"):  # fmt: skip
        saved_sae_lens(folder)
        cfg_path, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
        cfg = json.loads(cfg_path.read_text())
        if case == "cfg_not_json":
            cfg_path.write_text('{"d_in": 64, "d_sae": ')
        elif case == "cfg_list":
            cfg_path.write_text("[64, 128]")
        elif case == "cfg_no_d_sae":
            del cfg["d_sae"]
            cfg_path.write_text(json.dumps(cfg))
        elif case == "arch_gated":
            cfg["architecture"] = "gated"
            cfg_path.write_text(json.dumps(cfg))
        elif case == "weights_truncated":
            data = weights.read_bytes()
            weights.write_bytes(data[: len(data) // 2])
        elif case == "weights_text":
            weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
        elif case == "weights_wrong_shape":
            sd = {"W_enc": torch.zeros(D_IN, D_SAE), "b_enc": torch.zeros(D_SAE)}
            sd |= {"W_dec": torch.zeros(D_SAE, D_IN + 1), "b_dec": torch.zeros(D_IN)}
            save_file(sd, weights)
        elif case == "weights_missing_key":
            save_file({"W_enc": torch.zeros(D_IN, D_SAE), "b_enc": torch.zeros(D_SAE)}, weights)
        return folder
    path = tmp_path / f"{case}.pt"
    if case == "text_file":
        path.write_text("this is not an SAE\n")
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "pt_truncated":
        torch.save(openai_state_dict("TopK"), path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "pt_wrong_shape":
        sd = openai_state_dict("ReLU")
        sd["pre_bias"] = torch.zeros(D_IN + 2)
        torch.save(sd, path)
    elif case == "pt_not_a_dict":
        torch.save([torch.zeros(3)], path)
    elif case == "pt_missing_key":
        sd = openai_state_dict("ReLU")
        del sd["encoder.weight"]
        torch.save(sd, path)
    else:
        raise AssertionError(case)
    return path


BAD_FILES = {  # case -> (format, what the message must say)
    "missing": ("auto", "does not exist"),
    "cfg_not_json": ("auto", "cfg.json is not valid JSON"),
    "cfg_list": ("auto", "holds a JSON list"),
    "cfg_no_d_sae": ("auto", "has no d_sae"),
    "arch_gated": ("auto", "architecture 'gated' is not supported"),
    "weights_truncated": ("auto", "sae_weights.safetensors is not a complete safetensors file"),
    "weights_text": ("auto", "sae_weights.safetensors is not a complete safetensors file"),
    "weights_wrong_shape": ("auto", "W_dec has shape [128, 65], expected [128, 64]"),
    "weights_missing_key": ("auto", "lacks W_dec, b_dec"),
    "text_file": ("auto", "is not a torch.save file"),
    "empty_file": ("openai", "is empty (0 bytes)"),
    "pt_truncated": ("auto", "truncated or corrupt"),
    "pt_wrong_shape": ("auto", "pre_bias has shape [66], expected [64]"),
    "pt_not_a_dict": ("auto", "holds a list, not a state dict"),
    "pt_missing_key": ("auto", "no encoder.weight"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_local_file_problems_are_named_before_anything_loads(tmp_path: Path, case: str) -> None:
    fmt, expected = BAD_FILES[case]
    path = bad_sae(tmp_path, case)
    src = LocalSource(family="local", layer=3, path=str(path), format=fmt, hook_name=HOOK)
    with pytest.raises(UserError) as info:  # what the pipeline calls before loading the model
        src.required_model_kwargs()
    msg = str(info.value)
    assert expected in msg and "\n" not in msg
    assert str(path) in msg or path.name in msg


def test_local_format_and_path_mismatches(tmp_path: Path) -> None:
    folder = saved_sae_lens(tmp_path / "saved")
    with pytest.raises(UserError, match="is a folder; format=openai"):
        LocalSource("local", 3, str(folder), format="openai", hook_name=HOOK).check()
    with pytest.raises(UserError, match=r"part of a saved sae_lens SAE; set sae.path to its"):
        LocalSource("local", 3, str(folder / "sae_weights.safetensors")).check()
    with pytest.raises(UserError, match="give its folder"):
        LocalSource("local", 3, str(folder / "cfg.json"), format="sae_lens").check()
    with pytest.raises(UserError, match="sae.path is empty"):
        LocalSource("local", 3, "")
    # a good file is accepted and still needs its hook
    torch.save(openai_state_dict("ReLU"), tmp_path / "ok.pt")
    with pytest.raises(UserError, match="do not record their hook"):
        LocalSource("local", 3, str(tmp_path / "ok.pt")).required_model_kwargs()


# ----------------------------------------------------------------------------- the entrypoint


CLI_FILE_CASES = [
    "missing",
    "cfg_no_d_sae",
    "weights_truncated",
    "weights_wrong_shape",
    "text_file",
]


@pytest.mark.parametrize("case", CLI_FILE_CASES)
def test_cli_bad_local_file(cli, tmp_path: Path, case: str) -> None:
    fmt, expected = BAD_FILES[case]
    path = bad_sae(tmp_path, case)
    line = cli(["eval=core", "sae=local", f"sae.path={path}", f"sae.format={fmt}"]).error_line()
    assert expected in line, line


def test_cli_good_file_of_the_wrong_width_says_so(cli, tmp_path: Path) -> None:
    """A valid OpenAI SAE of width 64 on the embedded model (d_model 128): the width, not the
    weight processing the SAE asks for (which the embedded model also lacks)."""
    torch.save(openai_state_dict("TopK"), tmp_path / "v5.pt")
    args = ["eval=core", "sae=local", f"sae.path={tmp_path / 'v5.pt'}",
            "sae.hook_name=blocks.1.hook_resid_post"]  # fmt: skip
    line = cli(args).error_line()
    assert "has d_in=64 but model tiny-city-lm has d_model=128" in line, line


def test_known_width_is_checked_against_the_config(tmp_path: Path, bad_toy: Path) -> None:
    folder = saved_sae_lens(tmp_path / "saved")
    src = LocalSource("local", 3, str(folder))
    assert src.known_d_in() is None  # not read yet
    src.required_model_kwargs()
    assert src.known_d_in() == D_IN
    check_known_width(src, "m", D_IN)
    with pytest.raises(UserError, match=r"saved\) has d_in=64 but model m has d_model=128"):
        check_known_width(src, "m", 128)
    with pytest.raises(UserError, match="has d_in=128 but model m has d_model=64"):
        check_known_width(custom("bad_toy_sae.Square"), "m", 64)
    check_known_width(NoSource(), "m", 64)  # nothing known: nothing checked
