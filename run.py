"""Entry point: compose the Hydra config and run one job (see README)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from saeravel.config import exit_on_unknown_option, register_configs
from saeravel.pipeline import main_guarded

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> object:
    return main_guarded(cfg)


if __name__ == "__main__":
    exit_on_unknown_option(sys.argv[1:], Path(__file__).with_name("conf"))  # one line, exit 2
    main()
