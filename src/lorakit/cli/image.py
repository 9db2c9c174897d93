"""``lorakit train-image``: the image-LoRA training command (``lorakit.diffusion.train``).

    lorakit train-image --data train_data/ --output-dir runs/shapes [--config recipe.yaml] [key=value ...]

Flags, recipe keys and ``key=value`` overrides are the fields of ``ImageTrainArgs`` (later wins).
"""

from __future__ import annotations

import argparse


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    from ..diffusion.train import ImageTrainArgs
    from .options import add_flags

    p = sub.add_parser("train-image", help="train a LoRA/LoCon/LoHa/LoKr on captioned images (diffusion)",
                       description="Train an image LoRA on a kohya-style folder (N_name/ image + caption .txt). "
                                   "--model tiny (default) builds a small random-init model for offline demos.")
    p.add_argument("--config", help="YAML recipe whose keys are the flags below (with underscores)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. rank=8 steps=400")
    add_flags(p, ImageTrainArgs)
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    from ..diffusion.train import ImageTrainArgs, train_image
    from .options import build, load_yaml, parse_overrides

    recipe = load_yaml(ns.config) if ns.config else {}
    flags = {k: v for k, v in vars(ns).items() if k not in ("command", "config", "overrides", "run", "debug")}
    args = build(ImageTrainArgs, (f"recipe {ns.config}", recipe), ("the command-line flags", flags),
                 ("key=value arguments", parse_overrides(ns.overrides)))
    result = train_image(args)
    print(f"denoising loss: base {result.eval_base:.4f} → LoRA {result.eval_adapted:.4f}; wrote {result.output}")
    return 0
