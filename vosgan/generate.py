"""Write sample videos: ``python -m vosgan.generate --checkpoint CKPT --num N --out FILE``.

``FILE`` ending in ``.mp4`` or ``.gif`` gets the sample grid (video | foreground | mask |
background | D segmentation | D flow), one row per video, so ``N`` is at most
:data:`vosgan.evaluate.MAX_GRID_ROWS` (32) there; ``.pt`` gets the raw tensors
``{video, fg, mask, bg}`` (float32, on the CPU) of any number of videos. G (and D, for the grid)
run on ``--batch-size`` videos at a time; the latents are drawn at once from ``--seed``, so the
videos do not depend on the batch size. Exactly ``FILE`` is written (its folder is created), and
only once it is complete.
"""

from __future__ import annotations

import argparse
import sys

import torch

from vosgan import cli
from vosgan.evaluate import MAX_GRID_ROWS, load_models, sample_videos, write_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vosgan.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument(
        "--num",
        type=cli.int_at_least(1),
        default=8,
        help=f"number of videos (default 8; at most {MAX_GRID_ROWS} for .mp4/.gif)",
    )
    p.add_argument(
        "--out",
        type=cli.out_file(".mp4", ".gif", ".pt"),
        required=True,
        help="output .mp4, .gif or .pt",
    )
    p.add_argument(
        "--batch-size",
        type=cli.int_at_least(1),
        default=16,
        help="videos per forward pass of G and D (default 16)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the latents (default: 0)")
    cli.add_device(p)
    args = p.parse_args(argv)
    out = args.out
    if out.suffix != ".pt" and args.num > MAX_GRID_ROWS:
        p.error(
            f"argument --num: a {out.suffix} grid shows one video per row, at most "
            f"{MAX_GRID_ROWS}, got {args.num}; write a .pt file for more"
        )
    try:
        _, G, D, _ = load_models(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if out.suffix == ".pt":
        G.eval()
        parts = [
            {k: v.float().cpu() for k, v in o._asdict().items()}
            for o in sample_videos(G, args.num, args.seed, args.batch_size)
        ]
        tensors = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
        cli.write_atomic(out, lambda fh: torch.save(tensors, fh))
        written = [out]
    else:  # the stem keeps every dot of the name: out/r.sh.mp4 is written as such
        written = write_samples(
            G,
            D,
            out.with_name(out.stem),
            num=args.num,
            seed=args.seed,
            formats=(out.suffix,),
            batch_size=args.batch_size,
        )
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
