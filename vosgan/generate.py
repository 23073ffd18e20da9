"""Write sample videos: ``python -m vosgan.generate --checkpoint CKPT --num N --out FILE``.

``FILE`` ending in ``.mp4`` or ``.gif`` gets the sample grid (video | foreground | mask |
background | D segmentation | D flow); ``.pt`` gets the raw tensors ``{video, fg, mask, bg}``.
Exactly ``FILE`` is written (its folder is created), and only once it is complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from vosgan import cli
from vosgan.evaluate import load_models, write_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vosgan.generate", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run folder")
    p.add_argument("--num", type=cli.int_at_least(1), default=8, help="number of videos")
    p.add_argument(
        "--out",
        type=cli.out_file(".mp4", ".gif", ".pt"),
        required=True,
        help="output .mp4, .gif or .pt",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the latents (default: 0)")
    cli.add_device(p)
    args = p.parse_args(argv)
    out = args.out
    try:
        _, G, D, _ = load_models(args.checkpoint, args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if out.suffix == ".pt":
        G.eval()
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        with torch.no_grad():
            o = G(*G.sample_latents(args.num, args.device, generator=gen))
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        os.close(fd)
        try:  # a complete file or none: saved beside it, then renamed
            torch.save({k: v.cpu() for k, v in o._asdict().items()}, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written = [out]
    else:  # the stem keeps every dot of the name: out/r.sh.mp4 is written as such
        written = write_samples(
            G, D, out.with_name(out.stem), num=args.num, seed=args.seed, formats=(out.suffix,)
        )
    print("wrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
