"""Bad-input sweep 2 (Dec 1): diffusion LoRA files, GGUF paths, LLaMA-Pro expansion, O-LoRA's past.
Each case was a raw traceback, a silent misreading or a changed model before; now it is a LorakitError
naming the file / key / argument, and the model (every pipeline component) is as it was."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import AdapterFileError, ConfigError, OutputError, QuantizationError

from fault_helpers import assert_same, picture, tiny_llama

pytest.importorskip("diffusers")

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # a 64 × 64 Linear of the tiny UNet


def _parts():
    from tests.diffusion.tiny import sd1_parts

    return sd1_parts()


@pytest.fixture(scope="module")
def kohya_files(tmp_path_factory):
    """{kind: {key: tensor}} of a kohya/LyCORIS file (UNet + text encoder) for each adapter kind."""
    from lorakit.diffusion import DiffusionLoraConfig, add_adapter, save_kohya

    out = {}
    for kind in ("lora", "loha", "lokr"):
        parts = _parts()
        add_adapter(parts, DiffusionLoraConfig(kind=kind, rank=4, alpha=2.0, text_encoder=True), "s")
        out[kind] = load_file(save_kohya(parts, tmp_path_factory.mktemp(kind) / "f.safetensors", "s"))
    return out


def _load_refused(path, match, loader="kohya"):
    """Load ``path`` into a fresh SD1 pipeline: AdapterFileError matching ``match``, every component as it was."""
    from lorakit.diffusion import load_diffusers, load_kohya

    parts = _parts()
    before = {c: picture(m) for c, m in parts.items()}
    with pytest.raises(AdapterFileError, match=f"(?s){match}"):
        (load_kohya if loader == "kohya" else load_diffusers)(parts, path, "x")
    for c, m in parts.items():
        assert_same(before[c], picture(m))


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("alpha,msg", [
    (torch.ones(2), r"shape \(2,\); alpha must be one number"),   # ValueError: only one element tensors …
    (torch.zeros(0), r"shape \(0,\); alpha must be one number"),
    (torch.tensor(True), "torch.bool"),                             # loaded as alpha = 1
    (torch.tensor(float("nan")), "nan: alpha must be a finite number"),  # LoKr (two full factors): loaded
    (torch.tensor(0.0), "0.0: alpha must be a finite number > 0"),
], ids=["two", "empty", "bool", "nan", "zero"])
def test_kohya_alpha_must_be_one_finite_positive_number(tmp_path, kohya_files, kind, alpha, msg):
    f = tmp_path / "bad.safetensors"
    save_file({**kohya_files[kind], f"{Q}.alpha": alpha}, f)
    _load_refused(f, rf"bad.safetensors.*{Q}\.alpha.*{msg}")


@pytest.mark.parametrize("kind,suffix", [("lora", "lora_down.weight"), ("loha", "hada_w1_b"), ("lokr", "lokr_w1"),
                                         ("lokr", "lokr_w2")])
@pytest.mark.parametrize("bad", [torch.tensor(1.0), torch.ones(4), torch.zeros(0, 64)], ids=["0-d", "1-d", "rank0"])
def test_kohya_factor_that_is_not_a_matrix(tmp_path, kohya_files, kind, suffix, bad):
    # before: IndexError / "not enough values to unpack" / a ConfigError about rank_pattern
    f = tmp_path / "bad.safetensors"
    save_file({**kohya_files[kind], f"{Q}.{suffix}": bad}, f)
    _load_refused(f, rf"{Q}\.{suffix}: shape {tuple(bad.shape)}".replace("(", r"\(").replace(")", r"\)"))


@pytest.mark.parametrize("bad,msg", [
    (lambda t: torch.full_like(t, float("nan")), "NaN or inf"),
    (lambda t: t.to(torch.int32), "floating point"),
], ids=["nan", "int"])
def test_kohya_nan_or_integer_factors_are_refused(tmp_path, kohya_files, bad, msg):
    f = tmp_path / "bad.safetensors"
    sd = dict(kohya_files["lora"])
    sd[f"{Q}.lora_down.weight"] = bad(sd[f"{Q}.lora_down.weight"])
    save_file(sd, f)
    _load_refused(f, rf"{msg}.*{Q}\.lora_down\.weight|{Q}\.lora_down\.weight.*{msg}")  # before: loaded


@pytest.mark.parametrize("suffix", ["lokr_w1", "lokr_w2"])
def test_lokr_factors_whose_kronecker_product_is_not_the_module(tmp_path, kohya_files, suffix):
    sd = dict(kohya_files["lokr"])
    assert sd[f"{Q}.lokr_w1"].shape == sd[f"{Q}.lokr_w2"].shape == (8, 8)  # 8·8 = 64
    sd[f"{Q}.{suffix}"] = sd[f"{Q}.{suffix}"][:4].contiguous()  # 4·8 = 32 rows: not the module's 64
    f = tmp_path / "bad.safetensors"
    save_file(sd, f)
    _load_refused(f, rf"{Q} \(unet\.down_blocks.*to_q\): its Kronecker factors give .* the module's is \(64, 64\)")


def test_failed_load_gives_earlier_components_their_requires_grad_back(tmp_path, kohya_files):
    """The text encoder's part loads, the UNet's does not fit: the text encoder used to stay frozen."""
    sd = dict(kohya_files["lora"])
    sd[f"{Q}.lora_up.weight"] = sd[f"{Q}.lora_up.weight"][:, :2].contiguous()  # rank 2 vs lora_down's 4
    f = tmp_path / "bad.safetensors"
    save_file(sd, f)
    _load_refused(f, r"lora_up\.weight: file has shape \(64, 2\), model expects \(64, 4\)")


@pytest.fixture(scope="module")
def diffusers_file(tmp_path_factory):
    from lorakit.diffusion import DiffusionLoraConfig, add_adapter, save_diffusers

    parts = _parts()
    add_adapter(parts, DiffusionLoraConfig(rank=4, alpha=2.0), "s")
    f = save_diffusers(parts, tmp_path_factory.mktemp("d"), "s")
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        return load_file(f), h.metadata()


DQ = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.mark.parametrize("extra,meta,match", [
    ({f"{DQ}.alpha": torch.ones(2)}, None, rf"{DQ}\.alpha: .*shape \(2,\); alpha must be one number"),
    ({f"{DQ}.lora_A.weight": torch.tensor(1.0)}, None, rf"{DQ}\.lora_A\.weight: shape \(\) is not a 2-D"),
    ({"unet.nothere.lora_A.weight": torch.ones(2, 2), "unet.nothere.lora_B.weight": torch.ones(2, 2)}, None,
     "unet.nothere.lora_A.weight: unet has no module 'nothere'"),  # a TargetNotFoundError without the file
    ({"unet.nothere.alpha": torch.tensor(1.0)}, None, "unet.nothere.alpha: unet has no module"),  # was ignored
    ({"unet.conv_in.alpha": torch.tensor(1.0)}, None, r"unet\.conv_in\.alpha: the file has no lora_A/lora_B"),
    ({}, "[1, 2]", "lora_adapter_metadata must be a JSON object .* not a list"),  # AttributeError before
], ids=["alpha-shape", "A-0d", "unknown-module", "alpha-unknown-module", "alpha-without-lora", "meta-list"])
def test_diffusers_file_problems_name_the_file_and_key(tmp_path, diffusers_file, extra, meta, match):
    tensors, header = diffusers_file
    f = tmp_path / "bad.safetensors"
    save_file({**tensors, **extra}, f, metadata=header if meta is None else {**header, "lora_adapter_metadata": meta})
    _load_refused(f, rf"bad\.safetensors: .*{match}", loader="diffusers")


@pytest.mark.parametrize("path", [None, 3, 1.5])
def test_gguf_path_of_the_wrong_type(path):
    from lorakit.quant.gguf_load import load_gguf

    with pytest.raises(QuantizationError, match=rf"GGUF path {path!r}: must be a file path"):  # TypeError before
        load_gguf(path)


def test_expand_blocks_freeze_and_train_blocks_indices_are_checked():
    from lorakit.variants.expand import expand_blocks, train_blocks

    model = tiny_llama()
    before = picture(model)
    with pytest.raises(ConfigError, match="freeze='no': must be true or false"):  # 'no' used to freeze
        expand_blocks(model, 1, freeze="no")
    with pytest.raises(ConfigError, match="blocks '1': must be a list of block indices"):  # TypeError before
        train_blocks(model, "1")
    with pytest.raises(ConfigError, match=r"blocks \[1\.0\]: must be a list"):
        train_blocks(model, [1.0])
    assert_same(before, picture(model))


def test_olora_past_with_modules_the_adapter_does_not_target(tmp_path):
    """A past adapter with k_proj pairs loaded into an O-LoRA on q/v: k_proj's update was silently dropped."""
    from lorakit.variants.olora import add_olora, load_past

    prev = tiny_llama()
    lorakit.inject(prev, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "k_proj"],
                                            init_lora_weights=False), "a")
    lorakit.save_adapter(prev, tmp_path / "past", "a")
    model = tiny_llama()
    add_olora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = picture(model)
    with pytest.raises(AdapterFileError, match=r"past: cannot be O-LoRA's past.*\n  model\.layers\.0\.self_attn\.k_proj: "
                                               r"in the file, but the O-LoRA adapter does not target it"):
        load_past(model, tmp_path / "past")
    assert_same(before, picture(model))


def test_read_data_takes_a_path_and_refuses_other_types(tmp_path):
    """TrainArgs(data=Path(...)) was accepted and then failed in read_data with AttributeError."""
    from lorakit.data.files import read_data

    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "hello"}\n')
    assert read_data(f).rows == [{"text": "hello"}]
    with pytest.raises(ConfigError, match=r"data=None: give the path"):
        read_data(None)
    with pytest.raises(ConfigError, match=r"columns=\['text'\]: must be a mapping"):
        read_data(str(f), columns=["text"])


@pytest.mark.parametrize("n", [0, -1])
def test_distill_generator_max_new_tokens_below_one(n):
    """lorakit distill-data --max-new-tokens -1 ended in transformers' raw ValueError traceback."""
    from lorakit.tasks import build_tokenizer
    from lorakit.variants.sdft import hf_generator

    with pytest.raises(ConfigError, match=rf"max_new_tokens={n}: must be an integer in \[1,"):
        hf_generator(tiny_llama(), build_tokenizer(), max_new_tokens=n)


def test_builtin_eval_with_eval_rows_zero_is_no_eval():
    """`lorakit train --data builtin:shift eval_rows=0` crashed in encode (zip of no rows): 0 means off."""
    from lorakit.train.args import TrainArgs
    from lorakit.train.setup import load_data

    train, evaluation = load_data(TrainArgs(data="builtin:shift", eval_data="builtin:shift", eval_rows=0, builtin_rows=4))
    assert len(train.rows) == 4 and evaluation is None


@pytest.mark.parametrize("settings,output,error,match", [
    (dict(eval_rows=0), None, ConfigError, "eval_rows=0: learning and forgetting are scored on eval rows"),
    (dict(full_lr=-1.0), None, ConfigError, r"lr=-1\.0"),  # used to fail only after 'lora' had trained
    (dict(), "afile", OutputError, "--output-dir .*afile is a file"),  # was a lock-file message
], ids=["eval_rows", "full_lr", "output-file"])
def test_forgetting_settings_are_checked_before_any_run_trains(tmp_path, settings, output, error, match):
    from lorakit.eval.forgetting import RunSettings, measure_forgetting

    out = tmp_path / (output or "out")
    if output:
        out.write_text("keep me")
    with pytest.raises(error, match=match):
        measure_forgetting("shift", keep=["copy"], methods="lora,full", output_dir=out,
                           settings=RunSettings(**{**dict(steps=1, batch_size=2, builtin_rows=4, eval_rows=2), **settings}),
                           say=lambda *_: None)
    assert (out.read_text() == "keep me") if output else not out.exists()


def test_a_second_add_adapter_on_a_pipeline_targets_the_hosts():
    """add_adapter(pipe, ..., "b") after "a" targeted 'proj_in.base_layer' (TargetNotFoundError)."""
    from lorakit.diffusion import DiffusionLoraConfig, add_adapter
    from lorakit.state import lora_layers

    parts = _parts()
    add_adapter(parts, DiffusionLoraConfig(rank=2, conv_rank=2, text_encoder=True), "a")
    add_adapter(parts, DiffusionLoraConfig(rank=2, conv_rank=2, text_encoder=True), "b")
    for module in parts.values():
        hosts = dict(lora_layers(module))
        assert hosts and all(set(h.lora) == {"a", "b"} for h in hosts.values())
        assert not any(".base_layer" in p for p in hosts)


def test_save_and_load_arguments_of_the_wrong_kind(tmp_path):
    from lorakit.diffusion import DiffusionLoraConfig, add_adapter, load_kohya, save_diffusers, save_kohya

    parts = _parts()
    add_adapter(parts, DiffusionLoraConfig(rank=2), "a")
    before = {c: picture(m) for c, m in parts.items()}
    with pytest.raises(ConfigError, match="dtype=torch.int8: LoRA files are written in a floating-point dtype"):
        save_kohya(parts, tmp_path / "k.safetensors", "a", dtype=torch.int8)  # wrote rounded-away factors
    with pytest.raises(ConfigError, match="dtype=torch.int32"):
        save_diffusers(parts, tmp_path, "a", dtype=torch.int32)
    with pytest.raises(ConfigError, match=r"metadata\['k'\]=.*not JSON-serializable"):  # TypeError before
        save_kohya(parts, tmp_path / "k.safetensors", "a", metadata={"k": object()})
    with pytest.raises(AdapterFileError, match="LoRA file None: must be a path"):  # TypeError before
        load_kohya(parts, None, "b")
    assert list(tmp_path.iterdir()) == []
    for c, m in parts.items():
        assert_same(before[c], picture(m))


def test_export_gguf_adapter_arguments_of_the_wrong_type(tmp_path):
    from lorakit.quant.gguf_export import export_gguf_adapter

    with pytest.raises(ConfigError, match="adapter directory None: must be a path"):  # TypeError before
        export_gguf_adapter(None, tmp_path / "o.gguf", base=tmp_path / "base.gguf")
    for out in (None, ""):  # TypeError after all the work / an OSError about '.'
        with pytest.raises(ConfigError, match=rf"out={out!r}: give the path of the \.gguf file"):
            export_gguf_adapter(tmp_path, out, base=tmp_path / "base.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pattern", ["x", [True, False], 3])
def test_adalora_rank_pattern_that_is_not_a_mapping(pattern):
    from lorakit.errors import RankPatternError
    from lorakit.variants.adalora import AdaLoraConfig

    with pytest.raises(RankPatternError, match=r"rank_pattern=.*: must be a mapping"):  # AttributeError before
        AdaLoraConfig(init_r=4, target_r=2, total_step=100, target_modules=["q_proj"], rank_pattern=pattern)
