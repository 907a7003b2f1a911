"""Entry point of the throwaway sweep app (see sweep_app.yaml); run with sweep_parts on PYTHONPATH."""

import hydra
from omegaconf import DictConfig

from saeravel.pipeline import main_guarded


@hydra.main(version_base="1.3", config_path=".", config_name="sweep_app")
def main(cfg: DictConfig) -> object:
    from sweep_parts import register_fake_eval

    register_fake_eval()
    return main_guarded(cfg)


if __name__ == "__main__":
    main()
