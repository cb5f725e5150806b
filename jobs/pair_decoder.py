"""Declare that a tiny decoder (a diffusers AutoencoderTiny folder, e.g. TAESD) decodes a VAE's latents, so that
`jobs.generate --decoder DIR` may use it in place of the VAE's own decoder:

    python -m jobs.pair_decoder --decoder taesd/ --vae sd15/

It checks that the shapes agree (latent channels, up-sampling factor) and adds the VAE's weights sha256 to
DIR/ebd_pairs_with.json. Whether the pixels agree is yours to judge: TAESD is made for SD 1.x/2.x latents, TAESDXL
for SDXL's; a decoder paired with the wrong family decodes garbage.
"""

import argparse
import logging
import sys

from pipeline.common.config import run_cli
from pipeline.vae.autoencoder import pair_decoder, resolve_vae

log = logging.getLogger("ebd")


def main() -> int:
    prog = sys.argv[0] if sys.argv[0].startswith("ebd ") else "python -m jobs.pair_decoder"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.strip().splitlines()[0])
    p.add_argument("--decoder", required=True, help="AutoencoderTiny folder (config.json + safetensors)")
    p.add_argument("--vae", required=True, help="the VAE whose latents it decodes (SD checkpoint or VAE folder)")
    args = p.parse_args()
    path = pair_decoder(args.decoder, resolve_vae(args.vae))
    log.info("%s: %s now decodes the latents of the VAE in %s", path, args.decoder, args.vae)
    return 0


if __name__ == "__main__":
    run_cli(main)
