"""Bad-input and rollback sweep 5 (Dec 1): image-diffusion files and the pipeline API (kohya / LyCORIS /
diffusers files, weighted stacks, merging, saving), ``lorakit train-image``'s inputs, GGUF merge/export
output paths, and LoftQ's all-or-nothing injection. Each case was a raw traceback, a silent no-op, a
silently wrong scale, a partly changed pipeline or an overwritten input file before; now it is a
LorakitError naming the offending thing and the fix, and models / files are as they were."""

from __future__ import annotations

import copy
import errno
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import (
    AdapterFileError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    DataError,
    OutputError,
)

from fault_helpers import assert_same, picture, tiny_llama

Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # a 64 × 64 Linear of the tiny UNet
DQ = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def tree(path):
    """Every file under ``path`` with its bytes (directories as None)."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


# -- image pipelines ---------------------------------------------------------------------------------------
_BUILT: dict = {}  # one build per process of each pipeline; every test gets its own deep copy


def _parts():
    pytest.importorskip("diffusers")
    from tests.diffusion.tiny import sd1_parts

    if "plain" not in _BUILT:
        _BUILT["plain"] = sd1_parts()
    return copy.deepcopy(_BUILT["plain"])


def _two_adapters():
    if "two" not in _BUILT:
        _BUILT["two"] = _build_two_adapters()
    return copy.deepcopy(_BUILT["two"])


def _build_two_adapters():
    """SD1 parts with 'style' (UNet + text encoder) and 'char' (UNet), non-zero factors."""
    from lorakit.diffusion import DiffusionLoraConfig, add_adapter

    parts = _parts()
    add_adapter(parts, DiffusionLoraConfig(rank=4, alpha=2.0, text_encoder=True), "style")
    add_adapter(parts, DiffusionLoraConfig(rank=2, alpha=2.0), "char")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in parts.values():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return parts


def _pictures(parts):
    """picture() of every component plus every adapter's scaling (set_adapters changes those)."""
    return {c: (picture(m), [(n, getattr(x, "scaling", None), getattr(x, "base_scaling", None))
                             for n, x in m.named_modules()]) for c, m in parts.items()}


def _assert_unchanged(before, parts):
    after = _pictures(parts)
    for c in parts:
        assert_same(before[c][0], after[c][0])
        assert after[c][1] == before[c][1], c


@pytest.mark.parametrize("names,weights,error,msg", [
    (["style", "style"], [0.5, 0.5], ConfigError, r"\['style'\] listed more than once"),  # scaled the UNet, then raised
    (3, None, ConfigError, "names=3 must be an adapter name or a list"),                  # TypeError before
    (None, None, ConfigError, "names=None must be an adapter name or a list"),            # TypeError before
    (["style", 3], None, ConfigError, "adapter name 3 must be a string"),
    (["style"], "0.5", ConfigError, "weights='0.5' must be a number or a list"),  # "1 names but 3 weights" before
    (["style", "char"], {"style": 1}, ConfigError, "weights=.* must be a number or a list"),
    (["style", "zz"], None, AdapterNotFoundError, "no component of the pipeline holds an adapter named 'zz'"),
])
def test_set_adapters_refuses_before_changing_any_component(names, weights, error, msg):
    from lorakit.diffusion import set_adapters

    parts = _two_adapters()
    before = _pictures(parts)
    with pytest.raises(error, match=f"{msg}"):
        set_adapters(parts, names, weights)
    _assert_unchanged(before, parts)


@pytest.mark.parametrize("names,error,msg", [
    (["zz"], AdapterNotFoundError, "adapter named 'zz'"),            # merged nothing, silently
    (["style", "zz"], AdapterNotFoundError, "adapter named 'zz'"),   # merged style, ignored zz
    (3, ConfigError, "merge: names=3"),                              # TypeError before
    ([None], ConfigError, "adapter name None must be a string"),
    (["char", "char"], ConfigError, r"\['char'\] listed more than once"),
])
def test_pipeline_merge_names_are_checked(names, error, msg):
    from lorakit.diffusion import merge

    parts = _two_adapters()
    before = _pictures(parts)
    with pytest.raises(error, match=msg):
        merge(parts, names)
    _assert_unchanged(before, parts)


def test_pipeline_merge_of_one_name_given_as_a_string_merges_it():
    """merge(pipe, "style") iterated the characters before and merged nothing."""
    from lorakit.diffusion import merge

    parts = _two_adapters()
    host = parts["unet"].get_submodule(DQ)
    w0 = host.base_layer.weight.detach().clone()
    ad = host.lora["style"]
    expected = w0 + (2.0 / 4) * ad.lora_B.detach() @ ad.lora_A.detach()  # ΔW = α/r · B·A
    merge(parts, "style")
    torch.testing.assert_close(host.base_layer.weight.detach(), expected)
    assert host.merged == ["style"]


def _tie_text_encoder(parts):
    te = parts["text_encoder"]
    q = next(m for n, m in te.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    k = next(m for n, m in te.named_modules() if n.endswith("layers.0.self_attn.k_proj"))
    k.weight = q.weight


@pytest.mark.parametrize("how", ["merge", "merge_and_unload", "safe_merge"])
def test_pipeline_merge_is_all_components_or_none(how):
    """The text encoder refuses (a tied weight / an inf update); the UNet, merged first, stayed merged before."""
    from lorakit.diffusion import DiffusionLoraConfig, add_adapter, merge, merge_and_unload

    parts = _parts()
    if how != "safe_merge":
        _tie_text_encoder(parts)
    add_adapter(parts, DiffusionLoraConfig(rank=4, alpha=2.0, text_encoder=True), "style")
    with torch.no_grad():
        for module in parts.values():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        if how == "safe_merge":
            te_host = next(h for n, h in parts["text_encoder"].named_modules() if n.endswith("layers.1.mlp.fc2"))
            te_host.lora["style"].lora_B.fill_(math.inf)
    before = _pictures(parts)
    with pytest.raises(AdapterStateError, match="tied to|inf/NaN"):
        if how == "merge":
            merge(parts)
        elif how == "merge_and_unload":
            merge_and_unload(parts)
        else:
            merge(parts, safe_merge=True)
    _assert_unchanged(before, parts)


@pytest.mark.parametrize("call", ["kohya", "diffusers"])
@pytest.mark.parametrize("path", [None, 3, ""])
def test_save_paths_of_the_wrong_type(call, path):
    from lorakit.diffusion import save_diffusers, save_kohya

    parts = _two_adapters()
    with pytest.raises(ConfigError, match=r"LoRA (file|directory) .*: give the path to write"):  # TypeError before
        (save_kohya if call == "kohya" else save_diffusers)(parts, path, "style")


@pytest.mark.parametrize("call", ["kohya", "diffusers"])
@pytest.mark.parametrize("bad", ["nan", "inf", "fp16-overflow"])
def test_saving_non_finite_factors_writes_nothing(tmp_path, call, bad):
    """The loaders refuse NaN/inf factors, so the file written before was one nobody could load."""
    from lorakit.diffusion import save_diffusers, save_kohya

    parts = _two_adapters()
    host = parts["unet"].get_submodule(DQ)
    with torch.no_grad():
        host.lora["style"].lora_B[0, 0] = {"nan": math.nan, "inf": math.inf, "fp16-overflow": 1e6}[bad]
    kw = {"dtype": torch.float16} if bad == "fp16-overflow" else {}
    (tmp_path / "keep.txt").write_text("x")
    files = tree(tmp_path)
    with pytest.raises(AdapterStateError, match=r"adapter 'style' not saved to .*NaN or inf values: .*"
                                                r"(to_q\.lora_B\.weight|to_q\.lora_up\.weight)"):
        if call == "kohya":
            save_kohya(parts, tmp_path / "f.safetensors", "style", **kw)
        else:
            save_diffusers(parts, tmp_path / "d", "style", **kw)
    assert tree(tmp_path) == files


@pytest.mark.parametrize("config,msg", [
    ({"rank": 4}, "config must be a DiffusionLoraConfig .* not a dict"),  # AttributeError before
    ("lora", "not a str"),
])
def test_add_adapter_config_of_the_wrong_type(config, msg):
    from lorakit.diffusion import add_adapter

    parts = _parts()
    before = _pictures(parts)
    with pytest.raises(ConfigError, match=msg):
        add_adapter(parts, config, "x")
    _assert_unchanged(before, parts)


def test_add_adapter_that_adapts_nothing_is_refused():
    from lorakit.diffusion import DiffusionLoraConfig, add_adapter

    parts = {"unet": _parts()["unet"]}
    before = _pictures(parts)
    # before: returned {} — no adapter anywhere, and no word about it
    with pytest.raises(ConfigError, match=r"nothing to adapt — unet=False, text_encoder=True and the pipeline has "
                                          r"\['unet'\]"):
        add_adapter(parts, DiffusionLoraConfig(unet=False, text_encoder=True), "x")
    _assert_unchanged(before, parts)


# -- image LoRA files --------------------------------------------------------------------------------------
def _load_refused(path, match, loader="kohya"):
    from lorakit.diffusion import load_diffusers, load_kohya

    parts = _parts()
    before = _pictures(parts)
    with pytest.raises(AdapterFileError, match=f"(?s){match}"):
        (load_kohya if loader == "kohya" else load_diffusers)(parts, path, "x")
    _assert_unchanged(before, parts)


@pytest.fixture(scope="module")
def lokr_files(tmp_path_factory):
    """{decompose_both: {key: tensor}} of LoKr kohya files (w1 full + w2 factored / both factored)."""
    from lorakit.diffusion import DiffusionLoraConfig, add_adapter, save_kohya

    out = {}
    for both in (False, True):
        parts = _parts()
        add_adapter(parts, DiffusionLoraConfig(kind="lokr", rank=2, decompose_both=both, text_encoder=True), "s")
        out[both] = load_file(save_kohya(parts, tmp_path_factory.mktemp("lokr") / "f.safetensors", "s"))
    return out


@pytest.mark.parametrize("both,suffix", [(False, "lokr_w1"), (False, "lokr_w2_a"), (True, "lokr_w1_a"),
                                         (True, "lokr_w1_b"), (True, "lokr_w2_a")])
def test_lokr_matrix_factors_stored_as_4d_are_refused(tmp_path, lokr_files, both, suffix):
    sd = dict(lokr_files[both])
    sd[f"{Q}.{suffix}"] = sd[f"{Q}.{suffix}"][:, :, None, None].contiguous()
    f = tmp_path / "bad.safetensors"
    save_file(sd, f)
    # before: "too many values to unpack (expected 2)" for lokr_w1; the others loaded through the 1×1 reshape
    _load_refused(f, rf"bad\.safetensors: .*{Q}\.{suffix}: shape \(\d+, \d+, 1, 1\); LoKr's {suffix} is always a 2-D")


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory):
    """(tensors, header) of a diffusers-format LoRA of the tiny UNet (rank 4, α = 2)."""
    from safetensors import safe_open

    from lorakit.diffusion import DiffusionLoraConfig, add_adapter, save_diffusers

    parts = _parts()
    add_adapter(parts, DiffusionLoraConfig(rank=4, alpha=2.0), "s")
    with torch.no_grad():
        for n, p in parts["unet"].named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    f = save_diffusers(parts, tmp_path_factory.mktemp("d"), "s")
    with safe_open(str(f), "pt") as h:
        return load_file(f), h.metadata()


def _with_meta(tmp_path, diffusers_lora, **fields):
    tensors, header = diffusers_lora
    meta = {**json.loads(header["lora_adapter_metadata"]), **{f"unet.{k}": v for k, v in fields.items()}}
    f = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, f, metadata={**header, "lora_adapter_metadata": json.dumps(meta)})
    return f


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_an_empty_diffusers_file_is_refused(tmp_path, metadata):
    f = tmp_path / "empty.safetensors"
    save_file({}, f, metadata=metadata)
    # before: load_diffusers returned {} — no adapter, no error (load_kohya already refused)
    _load_refused(f, r"empty\.safetensors: holds no LoRA tensors", loader="diffusers")


def test_diffusers_dora_metadata_is_refused(tmp_path, diffusers_lora):
    f = _with_meta(tmp_path, diffusers_lora, use_dora=True)
    # before: loaded as plain LoRA, the DoRA magnitude silently dropped
    _load_refused(f, r"metadata lora_adapter_metadata says unet\.use_dora=true; DoRA .* not implemented",
                  loader="diffusers")


@pytest.mark.parametrize("r_alpha", [(4, 2.0), (4, 8.0)])
def test_diffusers_rslora_metadata_scales_by_alpha_over_sqrt_r(tmp_path, diffusers_lora, r_alpha):
    """PEFT (and so diffusers) scale an rsLoRA by α/√r; lorakit used α/r, silently."""
    from lorakit.diffusion import load_diffusers

    r, alpha = r_alpha
    f = _with_meta(tmp_path, diffusers_lora, use_rslora=True, lora_alpha=alpha, alpha_pattern={})
    parts = _parts()
    load_diffusers(parts, f, "x")
    tensors, _ = diffusers_lora
    a, b = tensors[f"unet.{DQ}.lora_A.weight"], tensors[f"unet.{DQ}.lora_B.weight"]
    assert a.shape[0] == r
    host = parts["unet"].get_submodule(DQ)
    expected = alpha / math.sqrt(r) * (b.double() @ a.double())  # Kalajdzievski 2023: s = α/√r
    torch.testing.assert_close(host.delta("x").double(), expected, rtol=1e-5, atol=1e-7)


# -- lorakit train-image's inputs --------------------------------------------------------------------------
@pytest.fixture
def shapes(tmp_path):
    pytest.importorskip("diffusers")
    from lorakit.diffusion.synthetic import write_shapes

    return write_shapes(tmp_path / "data", count=2)


@pytest.mark.parametrize("raw,line", [(b"\xff\xfe a caption", 1), (b"a red circle\nwith \xe9 accent\n", 2)])
def test_a_caption_that_is_not_utf8_is_named(shapes, raw, line):
    from lorakit.diffusion.data import scan

    cap = sorted(shapes.rglob("*.txt"))[0]
    cap.write_bytes(raw)
    # before: UnicodeDecodeError (a traceback from `lorakit train-image`)
    with pytest.raises(DataError, match=rf"{cap.name}: line {line} is not UTF-8 \(byte 0x(ff|e9) .*save the caption "
                                        "as UTF-8"):
        scan(shapes)


def test_cli_caption_not_utf8_is_an_error_line_not_a_traceback(shapes, tmp_path, capsys):
    from lorakit.cli import main

    sorted(shapes.rglob("*.txt"))[0].write_bytes(b"\xff")
    code = main(["train-image", "--data", str(shapes), "--output-dir", str(tmp_path / "o"), "steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "is not UTF-8" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_broken_image_is_found_before_the_run_writes_anything(shapes, tmp_path):
    from lorakit.diffusion.train import ImageTrainArgs, train_image

    sorted(shapes.rglob("*.png"))[-1].write_bytes(b"")  # an empty download
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"\.png: cannot be read as an image"):
        train_image(ImageTrainArgs(data=str(shapes), output_dir=str(out), steps=1, preview_steps=1),
                    log=lambda *_: None)
    assert not out.exists()  # before: run/previews/step-000000.png was written, then the loop failed


def test_an_output_dir_that_is_a_file_is_refused_up_front(shapes, tmp_path, monkeypatch):
    from lorakit.diffusion import train as image_train

    out = tmp_path / "out"
    out.write_text("notes")
    monkeypatch.setattr(image_train, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(OutputError, match=r"output_dir .*out' is a file, not a directory"):
        image_train.train_image(image_train.ImageTrainArgs(data=str(shapes), output_dir=str(out), steps=1))
    assert out.read_text() == "notes"


@pytest.mark.parametrize("present", [(), ("unet", "vae"), ("unet", "vae", "text_encoder", "scheduler")])
def test_a_model_folder_without_its_parts_is_named(tmp_path, present):
    from lorakit.diffusion.models import load_model

    (tmp_path / "model_index.json").write_text("{}")
    for sub in present:
        (tmp_path / sub).mkdir()
    # before: transformers' "Repo id must be in the form 'repo_name'" about .../tokenizer
    with pytest.raises(ConfigError, match=r"the pipeline folder has no .*tokenizer/.* \(it needs unet/, vae/"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name,msg", [
    ("", "must be a file name"), ("../up", "must be a file name"), ("a/b", "must be a file name"),
    ("..", "must be a file name"), (3, r"output_name=3: must be a string"),
])
def test_image_output_name_is_a_plain_file_name(name, msg):
    from lorakit.diffusion.train import ImageTrainArgs

    # before: "../up" wrote OUTPUT_DIR/../up.safetensors; 3 was a TypeError after the whole run
    with pytest.raises(ConfigError, match=msg):
        ImageTrainArgs(data="folder", output_name=name)


@pytest.mark.parametrize("field,value", [("model", None), ("caption_ext", None), ("output_dir", 5), ("data", 3)])
def test_image_train_args_string_fields(field, value):
    from lorakit.diffusion.train import ImageTrainArgs

    with pytest.raises(ConfigError, match=f"ImageTrainArgs {field}={value!r}: must be a string"):
        ImageTrainArgs(**{"data": "folder", field: value})


# -- GGUF merge / export outputs ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_adapter(tmp_path_factory):
    pytest.importorskip("gguf")
    from tests.quant.gguf_helpers import write_tiny_gguf

    from lorakit.quant.gguf_load import load_gguf

    root = tmp_path_factory.mktemp("gguf")
    base = root / "base.gguf"
    write_tiny_gguf(base, qtype="Q8_0")
    model = lorakit.inject(load_gguf(base), lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lorakit.save_adapter(model, root / "ad")
    return base, root / "ad"


def _gguf_call(which, adapter, out, base):
    from lorakit.quant.gguf_export import export_gguf_adapter
    from lorakit.quant.gguf_merge import merge_gguf

    return merge_gguf(adapter, out, base) if which == "merge" else export_gguf_adapter(adapter, out, base)


@pytest.mark.parametrize("which", ["merge", "export"])
@pytest.mark.parametrize("target", ["base", "adapter_model.safetensors", "adapter_config.json"])
def test_gguf_output_never_replaces_an_input(tmp_path, gguf_adapter, which, target):
    import shutil

    base, adapter = gguf_adapter
    shutil.copy(base, tmp_path / "base.gguf")
    shutil.copytree(adapter, tmp_path / "ad")
    base, adapter = tmp_path / "base.gguf", tmp_path / "ad"
    out = base if target == "base" else adapter / target
    files = tree(tmp_path)
    # before: the base GGUF (or the adapter's own weights) was replaced by the merged model / adapter GGUF
    with pytest.raises(OutputError, match=rf"--out .*{out.name}: is the input file .*would replace the input"):
        _gguf_call(which, adapter, out, base)
    assert tree(tmp_path) == files


@pytest.mark.parametrize("which", ["merge", "export"])
@pytest.mark.parametrize("where,msg", [("dir", "is a directory; give the path of a file"),
                                       ("under-file", r"notes\.txt is a file, not a directory"),
                                       ("none", r"give the path of the (\.gguf )?file to write")])
def test_gguf_output_path_problems_are_found_before_the_work(tmp_path, gguf_adapter, monkeypatch, which, where, msg):
    from lorakit.quant import gguf_export, gguf_merge

    base, adapter = gguf_adapter
    (tmp_path / "out.gguf").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    out = {"dir": tmp_path / "out.gguf", "under-file": tmp_path / "notes.txt" / "m.gguf", "none": None}[where]
    # before: the whole merge ran, then "cannot be written (Is a directory). Free disk space, …"
    monkeypatch.setattr(gguf_merge, "load_gguf", lambda *a, **k: pytest.fail("the base was loaded first"))
    monkeypatch.setattr(gguf_export, "gguf_adapter_tensors", lambda *a, **k: pytest.fail("the adapter was read first"))
    files = tree(tmp_path)
    with pytest.raises((OutputError, ConfigError), match=msg):
        _gguf_call(which, adapter, out, base)
    assert tree(tmp_path) == files


def test_cli_merge_gguf_onto_its_base_is_refused(tmp_path, gguf_adapter, capsys):
    import shutil

    from lorakit.cli import main

    base, adapter = gguf_adapter
    shutil.copy(base, tmp_path / "base.gguf")
    before = (tmp_path / "base.gguf").read_bytes()
    code = main(["merge", "--adapter", str(adapter), "--format", "gguf", "--model", str(tmp_path / "base.gguf"),
                 "--out", str(tmp_path / "base.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and "is the input file" in err and "Traceback" not in err
    assert (tmp_path / "base.gguf").read_bytes() == before


@pytest.mark.parametrize("code,hint", [(errno.EISDIR, "Give the path of a file, not a directory"),
                                       (errno.ENOTDIR, "A part of the path is a file"),
                                       (errno.EEXIST, "A part of the path is a file"),
                                       (errno.ENOSPC, "Free disk space")])
def test_output_errors_give_the_fix_for_their_cause(tmp_path, code, hint):
    from lorakit._fs import output_error

    err = output_error(OSError(code, "reason"), tmp_path / "x")
    assert isinstance(err, OutputError) and str(err).startswith(f"{tmp_path / 'x'}: cannot be written (reason). {hint}")


# -- LoftQ: all or nothing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["modules_to_save-typo", "interrupted"])
def test_loftq_inject_failing_in_inject_leaves_the_linears(monkeypatch, case):
    from lorakit.errors import TargetNotFoundError
    from lorakit.quant import loftq

    kw = {"modules_to_save": ["nope"]} if case == "modules_to_save-typo" else {}
    if case == "interrupted":  # Ctrl-C / out of memory while the adapter is being added
        monkeypatch.setattr(loftq, "inject", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    model = tiny_llama()
    before = picture(model)
    # before: every target stayed a QuantLinear (NF4) with no adapter on it
    with pytest.raises(TargetNotFoundError if case != "interrupted" else KeyboardInterrupt,
                       match="modules_to_save: module 'nope' matches no module" if case != "interrupted" else ""):
        loftq.loftq_inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
                                                     loftq_config={"loftq_bits": 4, "loftq_iter": 1}, **kw))
    assert_same(before, picture(model))
    assert all(type(m).__name__ != "QuantLinear" for m in model.modules())


# -- quantize_model on a model with merged adapters -----------------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "int8"])
def test_quantize_model_refuses_layers_with_merged_adapters(quant_type):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "a")
    lorakit.merge(model, ["a"])
    before = picture(model)
    # before: ΔW was quantized into the base with the host still saying "merged"; unmerge then raised
    # AttributeError: 'QuantLinear' object has no attribute 'weight'
    with pytest.raises(AdapterStateError, match=r"quantize_model: adapters are merged into layers it would quantize: "
                                                r"model\.layers\.0\.self_attn\.q_proj \(a\).*call lorakit\.unmerge"):
        lorakit.quantize_model(model, quant_type)
    assert_same(before, picture(model))


def test_quantize_model_may_skip_the_merged_layers():
    model = tiny_llama()
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a")
    lorakit.merge(model, ["a"])
    lorakit.quantize_model(model, skip=["q_proj.base_layer"])  # the merged layers stay float: allowed
    assert type(model.model.layers[0].self_attn.k_proj).__name__ == "QuantLinear"
    lorakit.unmerge(model)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight.detach(), w0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, "float16"])
def test_kohya_state_dict_dtype_is_checked(dtype):
    from lorakit.diffusion import kohya_state_dict

    parts = _two_adapters()
    # before: torch.int8 gave all-zero factors; "float16" an AttributeError
    with pytest.raises(ConfigError, match="LoRA files are written in a floating-point dtype"):
        kohya_state_dict(parts, "style", dtype)


# -- PiSSA / OLoRA conversion: never onto its own initial adapter --------------------------------------------
@pytest.mark.parametrize("spelling", ["same", "trailing-slash", "dot-dot"])
def test_save_as_lora_refuses_to_overwrite_the_initial_adapter(tmp_path, spelling):
    from lorakit.init_conversion import save_as_lora

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"), "a")
    init = tmp_path / "init"
    lorakit.save_adapter(model, init, "a")
    files = tree(tmp_path)
    out = {"same": init, "trailing-slash": str(init) + "/", "dot-dot": tmp_path / "x" / ".." / "init"}[spelling]
    # before: the converted rank-2r LoRA replaced A0/B0 — a second conversion then had no start to work from
    with pytest.raises(OutputError, match="is initial_path itself; writing there would replace the initial adapter"):
        save_as_lora(model, out, init, "a")
    assert tree(tmp_path) == files


# -- pickles are never unpickled ---------------------------------------------------------------------------
class _Trap:
    """Unpickling this creates ``marker`` (what a malicious .ckpt would do with os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("loader", ["kohya", "diffusers", "diffusers-dir", "gguf"])
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickled_checkpoint_is_refused_without_being_unpickled(tmp_path, loader, how):
    import pickle

    marker = tmp_path / "unpickled"
    name = "pytorch_lora_weights.safetensors" if loader == "diffusers-dir" else "lora.ckpt"
    f = tmp_path / "d" / name
    f.parent.mkdir()
    if how == "pickle":
        f.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": _Trap(marker)}))
    else:
        torch.save({"state_dict": {"a": torch.ones(2)}, "trap": _Trap(marker)}, f)
    assert not marker.exists()
    if loader == "gguf":
        from lorakit.errors import QuantizationError
        from lorakit.quant.gguf_load import load_gguf

        with pytest.raises(QuantizationError, match="not a readable GGUF file"):
            load_gguf(f)
    else:
        _load_refused(f.parent if loader == "diffusers-dir" else f,
                      r"cannot be read as safetensors .*not a \.safetensors LoRA \(convert \.ckpt/\.pt",
                      loader="kohya" if loader == "kohya" else "diffusers")
    assert not marker.exists()


@pytest.mark.parametrize("field", ["preview_prompts", "preview_seeds"])
def test_image_preview_lists_must_not_be_empty(field):
    from lorakit.diffusion.train import ImageTrainArgs

    # before: "cannot reshape tensor of 0 elements" / "torch.cat(): expected a non-empty list" after the model loaded
    with pytest.raises(ConfigError, match=rf"{field}=\[\]: must be a non-empty list"):
        ImageTrainArgs(data="folder", **{field: []})


@pytest.mark.parametrize("ext", ["txt", "", ".", "a/.txt", None])
def test_caption_ext_is_a_suffix_with_its_dot(shapes, ext):
    from lorakit.diffusion.data import scan
    from lorakit.diffusion.train import ImageTrainArgs

    # before: "Invalid suffix 'txt'" (ValueError from pathlib) once the data folder was scanned
    with pytest.raises(ConfigError, match=r"caption_ext=.*must be (a file suffix with its dot|a string)"):
        ImageTrainArgs(data=str(shapes), caption_ext=ext)
    with pytest.raises(DataError, match=r"caption_ext=.*: must be a file suffix with its dot, e\.g\. '\.txt'"):
        scan(shapes, caption_ext=ext)
    assert len(scan(shapes, caption_ext=".txt").items) == 2


# -- GGUF adapter export: damaged pairs and float16 overflow ------------------------------------------------
GQ = "base_model.model.model.layers.0.self_attn.q_proj"


def _edited_adapter(tmp_path, adapter, tensors=None, config=None):
    import shutil

    out = tmp_path / "ad"
    shutil.copytree(adapter, out)
    if tensors is not None:
        save_file({**load_file(out / "adapter_model.safetensors"), **tensors}, out / "adapter_model.safetensors")
    if config is not None:
        cfg = out / "adapter_config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **config}))
    return out


@pytest.mark.parametrize("a,b", [(torch.tensor(1.0), None), (torch.ones(256), None), (torch.ones(2, 256, 1), None),
                                 (torch.ones(0, 256), torch.ones(256, 0))], ids=["A-0d", "A-1d", "A-3d", "rank-0"])
def test_gguf_export_of_a_damaged_pair(tmp_path, gguf_adapter, a, b):
    from lorakit.quant.gguf_export import export_gguf_adapter

    base, adapter = gguf_adapter
    tensors = {f"{GQ}.lora_A.weight": a, **({f"{GQ}.lora_B.weight": b} if b is not None else {})}
    ad = _edited_adapter(tmp_path, adapter, tensors)
    # before: IndexError (0-d A) / ZeroDivisionError (rank 0) / "belongs to another model" (1-D, 3-D)
    with pytest.raises(AdapterFileError, match=r"q_proj has lora_A \(.*\) and lora_B .*a LoRA pair is A \(r, in\) and "
                                               r"B \(out, r\) with r ≥ 1"):
        export_gguf_adapter(ad, tmp_path / "out.gguf", base)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("case", ["large-factor", "large-scale"])
def test_gguf_export_f16_overflow_is_refused_not_written_as_inf(tmp_path, gguf_adapter, case):
    from lorakit.quant.gguf_export import export_gguf_adapter

    base, adapter = gguf_adapter
    if case == "large-factor":
        ad = _edited_adapter(tmp_path, adapter, {f"{GQ}.lora_B.weight": torch.full((256, 2), 1e6)})
    else:  # finite factors; the module's scale (α_pattern / (α / r)) folded into B overflows
        ad = _edited_adapter(tmp_path, adapter, {f"{GQ}.lora_B.weight": torch.full((256, 2), 100.0)},
                             {"lora_alpha": 1, "alpha_pattern": {"q_proj": 1e5}})
    with pytest.raises(ConfigError, match=r"blk\.0\.attn_q\.weight\.lora_b.* overflow float16 .*--outtype f32"):
        export_gguf_adapter(ad, tmp_path / "out.gguf", base, out_type="f16")
    assert not (tmp_path / "out.gguf").exists()
    export_gguf_adapter(ad, tmp_path / "out.gguf", base, out_type="f32")  # the fix it names works


@pytest.mark.parametrize("call,kw,msg", [
    ("diffusers", dict(fold_alpha="no"), "fold_alpha='no': must be true or false"),  # folded α/r before
    ("kohya", dict(metadata=[1]), r"metadata=\[1\]: must be a mapping"),            # AttributeError before
    ("kohya", dict(metadata="ss_x"), "metadata='ss_x': must be a mapping"),
])
def test_save_options_of_the_wrong_type(tmp_path, call, kw, msg):
    from lorakit.diffusion import save_diffusers, save_kohya

    parts = _two_adapters()
    with pytest.raises(ConfigError, match=msg):
        if call == "kohya":
            save_kohya(parts, tmp_path / "f.safetensors", "style", **kw)
        else:
            save_diffusers(parts, tmp_path / "d", "style", **kw)
    assert list(tmp_path.iterdir()) == []
