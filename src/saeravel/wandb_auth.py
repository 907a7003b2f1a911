"""Where the installed wandb client sends requests and finds its API key.

Shared by the wandb logger (saeravel.logger), Apollo's wandb SAE route (saeravel.saes) and
prefetch's host probe, so all three agree with the client: the host is
``wandb.Settings().base_url`` (``WANDB_BASE_URL``, else the client's default host, which
changed in wandb 0.31), and a key is ``WANDB_API_KEY`` / ``WANDB_IDENTITY_TOKEN_FILE``, else
the netrc entry that ``wandb login`` wrote for that host (read with wandb's own reader, which
also accepts the entry of the host behind it), else the key in wandb's settings file.
Imports nothing of saeravel.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

FALLBACK_HOST = "https://api.wandb.ai"  # wandb before 0.31, or wandb not installed


def _settings() -> object:
    """wandb's settings as ``wandb.init`` loads them (its settings file under
    ``WANDB_CONFIG_DIR`` or ``~/.config/wandb``, then the ``WANDB_*`` variables), without
    starting wandb's service."""
    import wandb

    settings = wandb.Settings()
    folder = os.environ.get("WANDB_CONFIG_DIR")
    base = Path(folder).expanduser() if folder else Path("~/.config/wandb").expanduser()
    settings.settings_system = str(base / "settings")
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings


def wandb_host() -> str:
    """The API URL the installed wandb client talks to (``WANDB_BASE_URL``, its settings
    file, else its default host)."""
    try:
        return str(_settings().base_url).rstrip("/")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 (no wandb, or a settings file it cannot read)
        return (os.environ.get("WANDB_BASE_URL") or FALLBACK_HOST).rstrip("/")


def _netrc_key(host: str) -> str | None:
    """The key of ``host`` in the netrc file wandb reads (``NETRC``, ``~/.netrc``)."""
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth

        return read_netrc_auth(host=host)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 (wandb rejects a malformed key: no usable key)
        return None
    name = os.environ.get("NETRC") or "~/.netrc"
    path = Path(name).expanduser()
    try:
        entry = netrc.netrc(str(path)).authenticators(urlsplit(host).netloc)
    except (netrc.NetrcParseError, OSError):
        return None
    return entry[2] if entry and entry[2] else None


def _settings_key(host: str) -> str | None:
    try:
        settings: object = _settings()
        key = getattr(settings, "api_key", None)
        same = str(getattr(settings, "base_url", "")).rstrip("/") == host.rstrip("/")
        return str(key) if key and same else None
    except Exception:  # noqa: BLE001
        return None


def has_wandb_credentials(host: str | None = None) -> bool:
    """Whether the wandb client could log in to ``host`` (default :func:`wandb_host`)
    without a prompt: an environment key, a netrc entry (``wandb login``) or a settings key."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = host or wandb_host()
    return bool(_netrc_key(host) or _settings_key(host))
