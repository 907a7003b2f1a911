"""The one hub-offline rule (huggingface_hub's true values) and the offline block."""

import pytest

from saeravel.hub import hub_offline, hub_offline_mode


@pytest.mark.parametrize(
    ("env", "offline"),
    [
        ({}, False),
        ({"HF_HUB_OFFLINE": "1"}, True),
        ({"HF_HUB_OFFLINE": "yes"}, True),
        ({"HF_HUB_OFFLINE": "On"}, True),
        ({"HF_HUB_OFFLINE": "0"}, False),
        ({"HF_HUB_OFFLINE": "no"}, False),
        ({"TRANSFORMERS_OFFLINE": "true"}, True),
        ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False),
    ],
)
def test_hub_offline_follows_huggingface_hub(monkeypatch, env, offline):
    from huggingface_hub.constants import _is_true

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert hub_offline() is offline
    # the library's own import-time rule gives the same answer
    lib = _is_true(env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE"))
    assert lib is offline


def test_offline_block_sets_and_restores_env_and_constant(monkeypatch):
    import os

    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with hub_offline_mode():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and hub_constants.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "yes" and hub_constants.HF_HUB_OFFLINE is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with hub_offline_mode(enabled=False):
        assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False
    with hub_offline_mode():
        pass
    assert "HF_HUB_OFFLINE" not in os.environ
