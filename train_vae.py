"""Train a 2D autoencoder (KL-VAE or VQ-AE) for latent diffusion.

    accelerate launch train_vae.py --config configs/<preset>.yaml [section.key=value ...]

Not implemented yet: the script reads and checks its config, then stops.
"""
from __future__ import annotations

import sys

from utils import config as config_lib


def main(argv=None):
    config_lib.parse_args(argv, __doc__)
    print("train_vae.py is not implemented yet", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    config_lib.run_main(main)
