"""scripts/bench_ravel.py (on its ``--small`` shapes) and scripts/gpu_check.sh: every mode the
benchmark times computes saeravel's step (same logits, loss and mask gradient for the same
mask), a missing peer is skipped with its install line, and the GPU check refuses a machine
without CUDA."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest
import torch

from helpers import ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_ravel", ROOT / "scripts" / "bench_ravel.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_ravel"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def models(bench):
    s = bench.shapes(True)
    hf = bench.hf_model(s)
    return s, hf, bench.tl_model(s, hf)


def _grad(cell) -> torch.Tensor:
    cell.opt.zero_grad()
    cell.loss().backward()
    return cell.params[0].grad.clone()


@pytest.mark.parametrize("method", ["neurons", "das"])
def test_every_mode_computes_saeravels_step(bench, models, method):
    s, hf, tl = models
    data = bench.Data(s["d_vocab"], ctx=20, tail=5, batch=4)
    m = torch.randn(s["d_model"], generator=torch.Generator().manual_seed(5))
    modes = [x for x in bench.STEP_MODES if x not in bench.PEERS or bench.available(x)]
    modes = [x for x in modes if x != "pyvene" or method == "neurons"]  # its own neuron mask
    cells = {x: bench.Cell(x, 1, tl, hf, data, method) for x in modes}
    for c in cells.values():
        c.set_mask(m)
    ref = cells["saeravel"]
    ref_logits, ref_loss, ref_grad = ref.logits(), ref.loss(), _grad(ref)
    for name, c in cells.items():
        torch.testing.assert_close(c.logits(), ref_logits, atol=1e-5, rtol=1e-5, msg=name)
        assert c.loss().item() == pytest.approx(ref_loss.item(), abs=1e-5), name
        torch.testing.assert_close(_grad(c), ref_grad, atol=1e-6, rtol=1e-4, msg=name)
    assert cells["seed"].mode == ("seed (nnsight)" if "nnsight" in modes else
                                  "seed (transformer_lens)")  # fmt: skip
    before = ref_logits.clone()
    ref.step()  # a step moves the mask: the assertions above compared live logits
    assert not torch.equal(ref.logits(), before)


def test_the_seed_runs_without_nnsight(bench, models, monkeypatch):
    s, hf, tl = models
    data = bench.Data(s["d_vocab"], ctx=20, tail=5, batch=4)
    monkeypatch.setattr(bench, "available", lambda peer: peer != "nnsight")
    seed, ours = (bench.Cell(x, 2, tl, hf, data, "neurons") for x in ("seed", "saeravel"))
    assert seed.mode == "seed (transformer_lens)"
    torch.testing.assert_close(seed.logits(), ours.logits(), atol=1e-5, rtol=1e-5)


def test_a_missing_peer_is_skipped_with_its_install_line(bench, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pyvene", None)  # import pyvene raises ImportError
    quiet = logging.getLogger("saeravel")
    monkeypatch.setattr(quiet, "level", quiet.level)  # main() quietens the jobs' loggers
    with caplog.at_level(logging.WARNING, logger="bench_ravel"):
        text = bench.main(["--small", "--layers", "1", "--rounds", "1", "--ctx", "20",
                           "--tail", "5", "--batch", "4"])  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "pyvene" in r.getMessage()]
    assert warned == [f"pyvene is not installed, its rows are skipped; install: {bench.INSTALL}"]
    rows = [line for line in text.splitlines() if line.startswith("| 1 |")]
    assert not any("pyvene" in r for r in rows)
    modes = {r.split("|")[2].strip().split(" ")[0] for r in rows}
    assert modes >= {"seed", "saeravel", "fast_false"} | {"nnsight"} & set(sys.modules)


def test_flop_limit_of_a_careful_peer_at_gpt2_shape(bench):
    s = bench.shapes(False)
    limit = [
        bench.step_flops("peer", layer, s, 60, 8) / bench.step_flops("saeravel", layer, s, 60, 8)
        for layer in (1, 5, 9)
    ]
    assert limit == pytest.approx([1.1, 1.5, 2.9], abs=0.06)  # the analytic limits
    seed, fast_false, peer = (
        bench.step_flops(m, 5, s, 60, 8) for m in ("seed", "fast_false", "peer")
    )
    assert seed > fast_false > peer


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_gpu_check_refuses_without_cuda():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and "no CUDA device" in run.stderr
