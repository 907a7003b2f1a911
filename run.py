"""Entry point: compose the Hydra config and run one job (see README and saeravel.cli)."""

import sys
from pathlib import Path

from saeravel.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], conf_dir=Path(__file__).with_name("conf")))
