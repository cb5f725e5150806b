"""Declare that a tiny decoder (a diffusers AutoencoderTiny folder, e.g. TAESD) decodes a VAE's latents, so that
`jobs.generate --decoder DIR` may use it in place of the VAE's own decoder:

    python -m jobs.pair_decoder --decoder taesd/ --vae sd15/

It checks that the shapes agree (latent channels, up-sampling factor) and adds the VAE's weights sha256 to
DIR/ebd_pairs_with.json. Whether the pixels agree is yours to judge: TAESD is made for SD 1.x/2.x latents, TAESDXL
for SDXL's; a decoder paired with the wrong family decodes garbage.
"""

import logging

from pipeline.common.config import job_parser, load_job_config, run_cli
from pipeline.vae.autoencoder import PairDecoderConfig, pair_decoder, resolve_vae

log = logging.getLogger("ebd")


def main() -> int:
    p = job_parser("jobs.pair_decoder", __doc__, address=False, config=PairDecoderConfig, flags=("decoder", "vae"),
                   required=("decoder", "vae"))
    cfg = load_job_config(p.parse_args())
    path = pair_decoder(cfg.decoder, resolve_vae(cfg.vae))
    log.info("%s: %s now decodes the latents of the VAE in %s", path, cfg.decoder, cfg.vae)
    return 0


if __name__ == "__main__":
    run_cli(main)
