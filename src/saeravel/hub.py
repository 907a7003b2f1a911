"""Hugging Face hub offline handling, in one place.

``HF_HUB_OFFLINE`` is read by huggingface_hub once, at import; a job that sets it later (or a
prefetch check that wants offline loads) must also set the library's constant, or an offline
load retries the network for ~30 s. The true values are huggingface_hub's own
(``constants.ENV_VARS_TRUE_VALUES``), and like the library ``TRANSFORMERS_OFFLINE`` counts
when ``HF_HUB_OFFLINE`` is unset.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def hub_offline() -> bool:
    """Whether the environment asks for offline mode, by huggingface_hub's rule."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in ENV_VARS_TRUE_VALUES


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling (transformers wraps the
    hub's errors in an ``OSError``)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def gated_message(exc: BaseException, repo_id: str) -> str | None:
    """One line for a load that failed because ``repo_id`` is gated (no token, or an account
    that has not accepted its licence), else None."""
    from huggingface_hub.errors import GatedRepoError

    if not any(
        isinstance(e, GatedRepoError) or "gated repo" in str(e).lower() for e in _chain(exc)
    ):
        return None
    return (
        f"{repo_id} is gated on Hugging Face: accept its licence at "
        f"https://huggingface.co/{repo_id} with your account, then set HF_TOKEN to a token of "
        "that account (or run `hf auth login`)"
    )


@contextlib.contextmanager
def hub_offline_mode(enabled: bool = True) -> Iterator[None]:
    """Offline mode for the block when ``enabled`` (``HF_HUB_OFFLINE=1`` in the environment and
    huggingface_hub's constant, for libraries that read either); both are restored after."""
    import huggingface_hub.constants as hub_constants

    if not enabled:
        yield
        return
    before_env = os.environ.get("HF_HUB_OFFLINE")
    before = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env
