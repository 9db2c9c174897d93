"""llama.cpp vs lorakit on lorakit's GGUF output: the figures docs/GGUF.md quotes.

    PYTHONPATH=src python bench/verify_llamacpp.py [--no-real] [--seeds 3]

For each case, the same token ids (12) decoded by llama.cpp's prebuilt libraries (the pinned
llama-cpp-py-sync wheel, tests/quant/llamacpp_lib.py) and by lorakit:
* adapter: base GGUF + ``export_gguf_adapter`` output, applied by ``llama_adapter_lora_init`` at
  scale 1 — tiny random F32 Llama / Mistral (untied head, LoRA on it) / Qwen2 (q/k/v biases) / Qwen3 (q/k norms, head_dim 128), two
  configs each (rank+alpha patterns; rsLoRA), and the real SmolLM2-135M-Instruct Q4_1;
* merge: ``lorakit merge --format gguf`` (f32 and f16) loaded as a plain model.
Columns (``llamacpp_lib.compare``): base_gap = max |cpp − ours| of the base alone / logit scale;
delta_max = max |Δ_ours| / scale; delta_rel = ‖Δ_cpp − Δ_ours‖ / ‖Δ_ours‖; noise_rel = ‖base gap‖ / ‖Δ_ours‖;
delta_cos; delta_maxabs = max |Δ_cpp − Δ_ours| / scale; argmax agreement; rel/noise = delta_rel / noise_rel
(worst, then the range over seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "quant"))

import llamacpp_lib  # noqa: E402
import test_gguf_llamacpp as T  # noqa: E402  (the tests' exact setup)

import lorakit  # noqa: E402
from lorakit.quant.gguf_export import export_gguf_adapter  # noqa: E402


def adapter_case(tmp: Path, arch: str, config: str, seed: int, out_type: str = "f32") -> dict[str, float]:
    base, model = T.f32_base(tmp, arch)
    cfg = dict(T.CONFIGS[config])
    if arch == "mistral":
        cfg["target_modules"] = T.TARGETS + ["lm_head"]
    model = lorakit.inject(model, lorakit.LoraConfig(**cfg))
    T.randomize(model, seed)
    lorakit.save_adapter(model, tmp / "adapter")
    lora = export_gguf_adapter(tmp / "adapter", tmp / "lora.gguf", base, out_type=out_type)
    ours_base, ours = T.lorakit_logits(model)
    return llamacpp_lib.compare(ours_base, ours, llamacpp_lib.logits(base, T.IDS),
                                llamacpp_lib.logits(base, T.IDS, [(lora, 1.0)]))


def f16_adapter_case(tmp: Path, arch: str, config: str, seed: int) -> dict[str, float]:
    return adapter_case(tmp, arch, config, seed, out_type="f16")


def merge_case(tmp: Path, arch: str, quant: str, seed: int) -> dict[str, float]:
    from lorakit.cli import main

    base, model = T.f32_base(tmp, arch)
    model = lorakit.inject(model, lorakit.LoraConfig(**T.CONFIGS["patterns"]))
    T.randomize(model, seed)
    lorakit.save_adapter(model, tmp / "adapter")
    out = tmp / "merged.gguf"
    with contextlib.redirect_stdout(io.StringIO()):  # the command's own summary line
        code = main(["merge", "--adapter", str(tmp / "adapter"), "--format", "gguf", "--out", str(out),
                     "--model", str(base), "--quant", quant])
    assert code == 0
    ours_base, ours = T.lorakit_logits(model)
    # the merged model against lorakit's adapted one; Δ from llama.cpp's run of the original base
    return llamacpp_lib.compare(ours_base, ours, llamacpp_lib.logits(base, T.IDS), llamacpp_lib.logits(out, T.IDS))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-real", action="store_true", help="skip the real SmolLM2 Q4_1 model")
    args = ap.parse_args()
    reason = llamacpp_lib.available()
    if reason:
        sys.exit(f"llama.cpp is not available: {reason}")
    _, lib, _ = llamacpp_lib.load()
    print(f"llama.cpp {llamacpp_lib.LLAMA_CPP_COMMIT} ({llamacpp_lib.WHEEL}=={llamacpp_lib.WHEEL_VERSION}); "
          f"system info: {llamacpp_lib.load()[0].string(lib.llama_print_system_info()).decode()[:80]}")
    cols = ("base_gap", "delta_max", "delta_rel", "noise_rel", "delta_cos", "delta_maxabs", "argmax_agree")
    print(f"{'case (worst over seeds)':34s}" + "".join(f"{c:>14s}" for c in (*cols, "rel/noise")))
    cases = [(f"adapter {a} F32 {c}", adapter_case, (a, c)) for a in ("llama", "mistral", "qwen2", "qwen3")
             for c in T.CONFIGS]
    cases.append(("adapter llama F32 patterns, f16 file", f16_adapter_case, ("llama", "patterns")))
    cases += [(f"merge {a} --quant {q}", merge_case, (a, q)) for a, q in (("llama", "f32"), ("qwen2", "f32"),
                                                                          ("llama", "f16"))]
    for name, fn, extra in cases:
        figs = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as d:
                figs.append(fn(Path(d), *extra, seed))
        show(name, figs, cols)
    if not args.no_real and T.smollm2_path() is not None:
        runs = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as d:
                runs.append(T.smollm2_figures(Path(d), llamacpp_lib, seed))
        show("SmolLM2-135M, F32 copy + adapter", [r[0] for r in runs], cols)
        show("SmolLM2-135M Q4_1 + adapter", [r[1] for r in runs], cols)


def show(name: str, figs: list[dict[str, float]], cols) -> None:
    for f in figs:  # Δ's error in units of the base-vs-base gap (≈ 1.4 for independent noise)
        f["rel/noise"] = f["delta_rel"] / f["noise_rel"]
    cols = (*cols, "rel/noise")
    worst = {c: (min if c in ("delta_cos", "argmax_agree", "delta_max") else max)(f[c] for f in figs) for c in cols}
    worst["range rel/noise"] = f"[{min(f['rel/noise'] for f in figs):.2f}, {worst['rel/noise']:.2f}]"
    print(f"{name:34s}" + "".join(f"{worst[c]:14.3g}" for c in cols) + f"  {worst['range rel/noise']}", flush=True)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
