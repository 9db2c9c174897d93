"""``lorakit train-image``: train a LoRA / LoCon / LoHa / LoKr on a folder of captioned images.

The loop, top to bottom (Ho et al. 2020, "DDPM", Algorithm 1, in the VAE's latent space as in
Rombach et al. 2022, §3.3):

    x0 = VAE.encode(image) · scaling_factor                   (B, 4, H/f, W/f)   frozen
    t ~ U{0..T-1},  ε ~ N(0, I),  x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε   DDPMScheduler.add_noise
    c = text_encoder(tokenize(caption))                       (B, L, D)   adapted if text_encoder=True
    loss = ‖UNet(x_t, t, c) − target‖²                         target = ε (or v for v-prediction)

Batches, timesteps and noise are a pure function of (seed, step), so a resumed run replays the same
draws. Every ``save_every`` steps a checkpoint (lorakit.train.checkpoint: atomic, weights_only) is
written; every ``preview_every`` steps a preview grid (fixed prompts × seeds); at the end the LoRA
in kohya format (default) or diffusers format, ``loss.csv`` and ``loss.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .._fs import atomic_write, atomic_write_text
from ..adapters import disabled
from ..errors import ConfigError, OutputError, TrainingError
from ..state import model_state
from ..train.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from ..validate import check_bool, check_field_types
from .config import DiffusionLoraConfig
from .data import assign_buckets, check_caption_ext, image_size, load_image, scan
from .inject import add_adapter
from .kohya import save_kohya
from .models import load_model, require_diffusers
from .peft_files import save_diffusers
from .preview import sample, save_grid

ADAPTER = "default"


def _real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class ImageTrainArgs:
    """Flags of ``lorakit train-image`` (each also a ``key=value`` override)."""

    data: str = ""
    output_dir: str = "runs/image"
    model: str = "tiny"
    output_name: str = "lora"
    format: str = "kohya"            # kohya (one .safetensors) | diffusers (pytorch_lora_weights.safetensors)
    kind: str = "lora"               # lora | loha | lokr
    rank: int = 4
    alpha: float = 4.0
    conv_rank: int = 0               # > 0: LoCon (ResNet / sampler k×k convs)
    conv_alpha: float = 0.0          # 0: = conv_rank
    text_encoder: bool = False
    resolution: int = 32
    buckets: bool = False
    steps: int = 100
    batch_size: int = 2
    lr: float = 1e-3
    text_encoder_lr: float = 0.0     # 0: = lr
    seed: int = 0
    save_every: int = 0              # 0: only at the end
    preview_every: int = 0           # 0: before and after only
    preview_prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])
    preview_seeds: list[int] = field(default_factory=lambda: [1, 2])
    preview_steps: int = 10
    guidance: float = 1.0
    caption_ext: str = ".txt"
    missing_caption: str = "error"   # error | skip | folder
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data is not set: pass --data FOLDER (images with a caption .txt beside each).")
        if self.format not in ("kohya", "diffusers"):
            raise ConfigError(f"format={self.format!r}: use kohya or diffusers.")
        for name in ("steps", "batch_size", "resolution", "rank", "preview_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r}: must be an integer ≥ 1.")
        for name in ("save_every", "preview_every", "conv_rank", "seed"):
            v = getattr(self, name)  # a str was a TypeError in the comparison
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name}={v!r}: must be an integer ≥ 0"
                                  + (" (0 turns it off)." if name != "seed" else "."))
        if not (_real(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r}: must be a positive number, e.g. 1e-4.")
        for name in ("text_encoder_lr", "conv_alpha", "guidance"):  # NaN / inf / negative were accepted
            v = getattr(self, name)
            if not (_real(v) and v >= 0):
                raise ConfigError(f"{name}={v!r}: must be a finite number ≥ 0.")
        if self.missing_caption not in ("error", "skip", "folder"):  # checked before the model loads
            raise ConfigError(f"missing_caption={self.missing_caption!r}: use error, skip or folder.")
        for name in ("text_encoder", "buckets", "resume"):
            check_bool(name, getattr(self, name))
        seeds = self.preview_seeds
        # an empty list was a torch error when the first preview grid was drawn, after the model loaded
        if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise ConfigError(f"preview_seeds={seeds!r}: must be a non-empty list of integers, e.g. [1, 2].")
        prompts = self.preview_prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(x, str) for x in prompts):
            raise ConfigError(f"preview_prompts={prompts!r}: must be a non-empty list of prompts, e.g. ['a red circle'].")
        if self.resolution % 8:
            raise ConfigError(f"resolution={self.resolution}: must be a multiple of 8.")
        self.adapter_config()  # validates kind / rank / alpha
        check_field_types(self)  # the rest: output_name=3 / model=None were TypeErrors at the end of the run
        check_caption_ext(self.caption_ext, ConfigError)
        name = str(self.output_name)
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
            # "../x" wrote the LoRA outside output_dir, "" a hidden ".safetensors"
            raise ConfigError(f"output_name={self.output_name!r}: must be a file name without a directory part "
                              "(e.g. 'my_style'); the LoRA is written as OUTPUT_DIR/<output_name>.safetensors.")

    def adapter_config(self) -> DiffusionLoraConfig:
        conv = self.conv_rank or None
        return DiffusionLoraConfig(kind=self.kind, rank=self.rank, alpha=self.alpha, conv_rank=conv,
                                   conv_alpha=(self.conv_alpha or None) if conv else None,
                                   text_encoder=self.text_encoder)

    def fingerprint(self) -> dict:
        keep = ("data", "model", "kind", "rank", "alpha", "conv_rank", "conv_alpha", "text_encoder", "resolution",
                "buckets", "batch_size", "seed")
        return {k: getattr(self, k) for k in keep}


@dataclass
class ImageTrainResult:
    output: Path
    steps: int
    losses: list[float]
    skipped: int
    previews: list[Path]
    eval_base: float    # denoising loss on the training images, adapters off (fixed noise and t)
    eval_adapted: float  # the same with the trained adapter


@torch.no_grad()
def denoising_loss(model, items, sizes, seed: int = 1234, draws: int = 4) -> float:
    """Mean noise-prediction MSE over ``items`` × ``draws`` fixed (t, ε): comparable between models."""
    DDPMScheduler = require_diffusers().DDPMScheduler
    sched = DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for i, item in enumerate(items):
        x0 = model.vae.encode(load_image(item.image, sizes[i])[None]).latent_dist.mode() * model.latent_scale
        ctx = model.text_encoder(model.tokenize([item.caption]))[0]
        for _ in range(draws):
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
            pred = model.unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=ctx).sample
            target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
            total += F.mse_loss(pred, target).item()
            n += 1
    return total / n


def _batch_plan(order: list[int], sizes: list[tuple[int, int]], batch: int, seed: int, step: int) -> list[int]:
    """Items of step ``step``: a seeded shuffle of the epoch, grouped so a batch shares one bucket size."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    first = order[int(torch.randint(len(order), (1,), generator=g))]
    same = [i for i in order if sizes[i] == sizes[first]]
    picks = torch.randint(len(same), (batch - 1,), generator=g).tolist()
    return [first] + [same[p] for p in picks]


def train_image(args: ImageTrainArgs, log=print) -> ImageTrainResult:
    DDPMScheduler = require_diffusers().DDPMScheduler
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():  # found only when the first preview was written, after loading
        raise OutputError(f"output_dir {str(out)!r} is a file, not a directory; give a directory for the run's "
                          "previews, checkpoints and LoRA.")
    ds = scan(args.data, args.caption_ext, args.missing_caption)
    for it in ds.items:  # every image's header before anything is written (a bad one stopped the loop midway)
        image_size(it.image)
    sizes = assign_buckets(ds, args.resolution, args.buckets)
    order = ds.expanded()
    model = load_model(args.model, args.seed)
    for p in [*model.unet.parameters(), *model.vae.parameters(), *model.text_encoder.parameters()]:
        p.requires_grad_(False)
    add_adapter(model.components(), args.adapter_config(), ADAPTER)
    unet_params = [p for p in model.unet.parameters() if p.requires_grad]
    te_params = [p for p in model.text_encoder.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": args.lr}]
    if te_params:
        groups.append({"params": te_params, "lr": args.text_encoder_lr or args.lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    named = _trainable(model)
    cache: dict[int, torch.Tensor] = {}  # item → latents (the VAE is frozen)

    start, losses = 0, []
    ckpt_root = out / "checkpoints"
    if args.resume and list_checkpoints(ckpt_root):
        ck = load_checkpoint(list_checkpoints(ckpt_root)[-1])
        if ck.state.get("fingerprint") != json.loads(json.dumps(args.fingerprint())):
            raise ConfigError(f"{ck.path} belongs to a run with other settings ({ck.state.get('fingerprint')}); "
                              "resume with the same settings or use another output_dir.")
        with torch.no_grad():
            for k, t in ck.trainable.items():
                named[k].copy_(t)
        opt.load_state_dict(ck.optimizer)
        start, losses = ck.step, list(ck.state["losses"])
        log(f"resumed from {ck.path} at step {start}")

    previews = []
    size = (args.resolution, args.resolution)
    if start == 0:
        previews.append(_preview(model, args, size, out, 0))
    t0 = time.time()
    for step in range(start, args.steps):
        idx = _batch_plan(order, sizes, args.batch_size, args.seed, step)
        for i in idx:
            if i not in cache:
                img = load_image(ds.items[i].image, sizes[i])[None]
                with torch.no_grad():
                    cache[i] = model.vae.encode(img).latent_dist.mode()[0] * model.latent_scale
        x0 = torch.stack([cache[i] for i in idx])
        g = torch.Generator().manual_seed(args.seed * 7_919 + step)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        xt = sched.add_noise(x0, noise, t)
        ids = model.tokenize([ds.items[i].caption for i in idx])
        model.unet.train(), model.text_encoder.train()
        ctx = model.text_encoder(ids)[0]
        pred = model.unet(xt, t, encoder_hidden_states=ctx).sample
        target = sched.get_velocity(x0, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        loss = F.mse_loss(pred.float(), target.float())
        if not torch.isfinite(loss):
            raise TrainingError(f"step {step + 1}: the loss is {loss.item()}; lower lr (now {args.lr}).")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.unet.eval(), model.text_encoder.eval()
        losses.append(loss.item())
        done = step + 1
        if done % 10 == 0 or done == args.steps:
            log(f"step {done}/{args.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                f"({(time.time() - t0) / max(1, done - start):.2f} s/step)")
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            _checkpoint(ckpt_root, done, named, opt, losses, args)
        if args.preview_every and done % args.preview_every == 0 and done < args.steps:
            previews.append(_preview(model, args, size, out, done))
    previews.append(_preview(model, args, size, out, args.steps))
    _checkpoint(ckpt_root, args.steps, named, opt, losses, args)
    meta = {"ss_output_name": args.output_name, "ss_steps": str(args.steps), "ss_learning_rate": str(args.lr),
            "ss_resolution": f"({args.resolution}, {args.resolution})", "ss_num_train_images": str(len(order)),
            "ss_sd_model_name": args.model, "ss_seed": str(args.seed), "ss_enable_bucket": str(args.buckets)}
    if args.format == "kohya":
        path = save_kohya(model.components(), out / f"{args.output_name}.safetensors", ADAPTER, metadata=meta)
    else:
        path = save_diffusers(model.components(), out, ADAPTER)
    _write_losses(out, losses)
    if ds.skipped:
        log(f"skipped {len(ds.skipped)} image(s) without a caption: {', '.join(str(p) for p in ds.skipped[:5])}")
    with ExitStack() as stack:
        for module in model.components().values():
            if model_state(module) is not None:
                stack.enter_context(disabled(module))
        base = denoising_loss(model, ds.items, sizes)
    adapted = denoising_loss(model, ds.items, sizes)
    log(f"denoising loss on the training images: base {base:.4f} → with the LoRA {adapted:.4f}")
    atomic_write_text(out / "summary.json", json.dumps({"output": str(path), "steps": args.steps,
                                                        "final_loss": losses[-1] if losses else None,
                                                        "eval_base": base, "eval_adapted": adapted,
                                                        "skipped_without_caption": [str(p) for p in ds.skipped],
                                                        "args": dataclasses.asdict(args)}, indent=1))
    log(f"saved {path}")
    return ImageTrainResult(path, args.steps, losses, len(ds.skipped), previews, base, adapted)


def _trainable(model) -> dict[str, torch.Tensor]:
    out = {}
    for comp, module in model.components().items():
        for n, p in module.named_parameters():
            if p.requires_grad:
                out[f"{comp}.{n}"] = p
    return out


def _checkpoint(root, step, named, opt, losses, args) -> None:
    save_checkpoint(root, step, trainable=named, optimizer=opt.state_dict(), schedule={}, hooks=[],
                    rng=[rng_state()], state={"losses": losses, "fingerprint": args.fingerprint()}, keep=2)


def _preview(model, args, size, out: Path, step: int) -> Path:
    images = sample(model, args.preview_prompts, args.preview_seeds, size, args.preview_steps, args.guidance)
    path = out / "previews" / f"step-{step:06d}.png"
    save_grid(images, len(args.preview_prompts), path)
    return path


def _write_losses(out: Path, losses: list[float]) -> None:
    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "loss"])
            w.writerows((i + 1, f"{v:.6g}") for i, v in enumerate(losses))

    atomic_write(out / "loss.csv", write_csv)
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k + 1}")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out / "loss.png", lambda tmp: fig.savefig(tmp, format="png"))
