"""Pre-compute a latent cache with a frozen autoencoder, split across all processes.

    accelerate launch encode_latents.py --config configs/<preset>.yaml [section.key=value ...]

Not implemented yet: the script reads and checks its config, then stops.
"""
from __future__ import annotations

import sys

from utils import config as config_lib


def main(argv=None):
    config_lib.parse_args(argv, __doc__)
    print("encode_latents.py is not implemented yet", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    config_lib.run_main(main)
