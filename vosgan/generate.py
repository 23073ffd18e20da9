"""Write sample videos: ``python -m vosgan.generate --checkpoint CKPT --num N --out FILE``.

``FILE`` ending in ``.mp4`` or ``.gif`` gets the sample grid (video | foreground | mask |
background | D segmentation | D flow); ``.pt`` gets the raw tensors ``{video, fg, mask, bg}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vosgan.evaluate import load_models, write_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vosgan.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--num", type=int, default=8, help="number of videos")
    p.add_argument("--out", required=True, help="output .mp4, .gif or .pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".mp4", ".gif", ".pt"):
        print(f"error: --out must end in .mp4, .gif or .pt, got {out.name!r}", file=sys.stderr)
        return 2
    if args.num < 1:
        print(f"error: --num must be >= 1, got {args.num}", file=sys.stderr)
        return 2
    try:
        _, G, D, _ = load_models(args.checkpoint, torch.device(args.device))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if out.suffix == ".pt":
        G.eval()
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        with torch.no_grad():
            o = G(*G.sample_latents(args.num, args.device, generator=gen))
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in o._asdict().items()}, out)
        written = [out]
    else:
        written = write_samples(
            G, D, out.with_suffix(""), num=args.num, seed=args.seed, formats=(out.suffix,)
        )
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
