"""Bad-input sweep 4 (Dec 1): LoRA-only fields in LoHa/LoKr files, eval_every without eval data, the one
table of methods; then the multi-adapter API, weight-based inits, combine, save, losses, data files, GGUF
and kohya files, and the CLI. Each case was a raw traceback, a silent acceptance or a file lorakit itself
refuses to read before; now it is a LorakitError naming the bad value and the fix, and the model / files
are as they were."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import lorakit
from lorakit.errors import AdapterStateError, ConfigError

from fault_helpers import assert_same, picture, tiny_llama


def with_adapter(name="a", targets=("q_proj", "v_proj"), r=4):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=r, target_modules=list(targets), init_lora_weights=False), name)
    return model


def tree(path):
    """Every file under ``path`` with its bytes (directories included as None)."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


# -- leftover 1: LoRA-only fields in a LoHa / LoKr adapter_config.json ---------------------------------------
@pytest.fixture(scope="module", params=["loha", "lokr"])
def lycoris_dir(request, tmp_path_factory):
    make = lorakit.LoHaConfig if request.param == "loha" else lorakit.LoKrConfig
    model = tiny_llama()
    lorakit.inject(model, make(r=2, alpha=4, target_modules=["q_proj"], init_weights=False), "a")
    path = tmp_path_factory.mktemp(request.param) / "ad"
    lorakit.save_adapter(model, path, "a")
    return path


def _edited(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = dst / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))
    return dst


@pytest.mark.parametrize("field,value", [
    ("use_dora", True), ("use_rslora", True), ("lora_alpha", 16), ("bias", "all"), ("lora_bias", True),
    ("layer_replication", [[0, 2]]), ("target_parameters", ["experts.down_proj"]), ("trainable_token_indices", [1]),
    ("alora_invocation_tokens", [3]), ("use_qalora", True), ("ensure_weight_tying", True), ("use_rslora", 1),
])
def test_lora_only_fields_that_change_the_meaning_are_refused(lycoris_dir, tmp_path, field, value):
    ad = _edited(lycoris_dir, tmp_path / "ad", **{field: value})
    files = tree(tmp_path)
    model = tiny_llama()
    before = picture(model)
    # before: silently dropped — DoRA / rsLoRA / α from lora_alpha were never applied
    with pytest.raises(ConfigError, match=rf"(?s)adapter_config\.json: peft_type LO(HA|KR) with LoRA-only .*{field}="):
        lorakit.load_adapter(model, ad, "x")
    assert_same(before, picture(model))
    assert tree(tmp_path) == files


@pytest.mark.parametrize("field,value", [("lora_dropout", 0.1), ("init_lora_weights", "gaussian"),
                                         ("loftq_config", {"loftq_bits": 4}), ("fan_in_fan_out", True),
                                         ("megatron_core", "mc")])
def test_training_time_lora_fields_load_with_a_warning_naming_them(lycoris_dir, tmp_path, field, value):
    ad = _edited(lycoris_dir, tmp_path / "ad", **{field: value})
    ref = tiny_llama()
    lorakit.load_adapter(ref, lycoris_dir, "x")
    model = tiny_llama()
    with pytest.warns(UserWarning, match=rf"ignores the LoRA-only field\(s\) {field}="):
        lorakit.load_adapter(model, ad, "x")
    x = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)  # the same adapter as without the field


def test_lora_fields_at_peft_defaults_pass_silently(lycoris_dir, tmp_path):
    """What a tool dumping every LoRA field with PEFT's defaults writes: nothing to say."""
    alpha = json.loads((lycoris_dir / "adapter_config.json").read_text())["alpha"]
    ad = _edited(lycoris_dir, tmp_path / "ad", use_dora=False, use_rslora=False, lora_dropout=0.0, bias="none",
                 init_lora_weights=True, loftq_config={}, layer_replication=None, lora_alpha=alpha,
                 runtime_config={"ephemeral_gpu_offload": False}, megatron_core="megatron.core")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(tiny_llama(), ad, "x")


def test_unknown_lycoris_fields_warn_and_bad_objects_are_refused(lycoris_dir, tmp_path):
    ad = _edited(lycoris_dir, tmp_path / "ad", rank_droput=0.1)
    with pytest.warns(UserWarning, match="ignoring fields lorakit does not know for LO(HA|KR).*rank_droput"):
        lorakit.load_adapter(tiny_llama(), ad, "x")  # dropped silently before
    for data in ([], None, "x"):  # AttributeError: 'list' object has no attribute 'items' before
        with pytest.raises(ConfigError, match="must hold a JSON object of LOHA settings"):
            lorakit.LoHaConfig.from_peft_dict(data)
    with pytest.raises(ConfigError, match="peft_type is 'LOKR', not 'LOHA'"):  # read as LoHa before
        lorakit.LoHaConfig.from_peft_dict({"peft_type": "LOKR", "target_modules": ["q_proj"]})


def test_the_lycoris_decisions_cover_peft_and_the_docs():
    from pathlib import Path

    from lorakit.adapter_kinds.lycoris_fields import LORA_ONLY_FIELDS

    peft = pytest.importorskip("peft")
    lora = {f.name for f in __import__("dataclasses").fields(peft.LoraConfig)}
    for cls in (peft.LoHaConfig, peft.LoKrConfig):
        own = {f.name for f in __import__("dataclasses").fields(cls)}
        assert set(LORA_ONLY_FIELDS) == lora - own
    text = (Path(__file__).resolve().parents[2] / "docs" / "PEFT_FIELDS.md").read_text(encoding="utf-8")
    section = text[text.index("## LoHa / LoKr files"):]
    for name, (status, _, _) in LORA_ONLY_FIELDS.items():
        assert f"| `{name}` | {status} |" in section, name


# -- leftover 2: eval_every without eval data -------------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(eval_every=2), r"eval_every=2 evaluates the eval data during training, but this run has none \(data=.*"
                         r"rows\.jsonl is a file and neither eval_data nor eval_split is set\); give eval_data"),
    (dict(eval_every=2, save_best=True), "save_best needs eval data; give eval_data or eval_split"),
    (dict(early_stopping_patience=1, eval_every=1), "early_stopping_patience needs eval data"),
])
def test_eval_every_without_eval_data_is_refused_before_anything_is_written(tmp_path, kw, msg):
    from lorakit.train import TrainArgs
    from lorakit.train.loop import train

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "hello"}\n' * 4)
    out = tmp_path / "runs" / "r"
    with pytest.raises(ConfigError, match=msg):  # ran with no evaluation at all before (eval_every alone)
        train(TrainArgs(data=str(data), output_dir=str(out), max_steps=1, progress=False, **kw))
    assert not (tmp_path / "runs").exists()


def test_builtin_eval_rows_zero_with_eval_every_is_refused(tmp_path):
    from lorakit.train import TrainArgs
    from lorakit.train.setup import check_eval_settings, has_eval_data, resolve_defaults

    args = resolve_defaults(TrainArgs(data="builtin:shift", eval_rows=0, eval_every=5, output_dir=str(tmp_path / "o")))
    assert not has_eval_data(args)
    with pytest.raises(ConfigError, match="eval_every=5 .*eval_rows=0 turns off the eval split of builtin:shift"):
        check_eval_settings(args)
    for ok in (dict(data="builtin:shift"), dict(data="f.jsonl", eval_split=0.1), dict(data="f.jsonl", eval_data="e.jsonl")):
        check_eval_settings(resolve_defaults(TrainArgs(eval_every=5, **ok)))


# -- leftover 3: one table of methods ---------------------------------------------------------------------
def test_methods_are_one_table_that_trainargs_reads():
    import ast
    from pathlib import Path

    from lorakit.train import methods
    from lorakit.train.args import METHOD_NAMES

    assert METHOD_NAMES == tuple(methods.METHODS)
    assert methods.OPTION_CHECKS == {n: m.check_options for n, m in methods.METHODS.items()}
    src = Path(methods.__file__).read_text(encoding="utf-8")
    imported = {n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)}
    assert "args" not in imported  # methods.py does not import args.py: no cycle, no second list
    with pytest.raises(ConfigError, match="method='dora': not a lorakit method; choose one of lora, loraplus"):
        from lorakit.train import TrainArgs

        TrainArgs(method="dora")


# -- multi-adapter API: combine ---------------------------------------------------------------------------
def _two():
    model = with_adapter()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), "b")
    return model


@pytest.mark.parametrize("method,weights,half", [
    ("cat", [1e300, 1e300], False), ("svd", [1e300, 1e300], False), ("linear", [1e300, 1e300], False),
    ("cat", [1e12, 1e12], True), ("linear", [1e12, 1e12], True),  # fp16 factors (svd's new factors are fp32)
])
def test_combine_weights_that_overflow_are_refused(method, weights, half):
    model = _two()
    if half:
        model.half()
    before = picture(model)
    # before: an adapter 'c' with inf factors was added (svd: torch's _LinAlgError)
    with pytest.raises(ConfigError, match=r"combine_adapters at model\.layers\.0\.self_attn\.q_proj: weights .* give "
                                          "inf/NaN values .*use smaller weights"):
        lorakit.combine_adapters(model, ["a", "a"], weights, "c", method=method)
    assert_same(before, picture(model))


@pytest.mark.parametrize("kw,msg", [(dict(weights=[True]), r"weights\[0\]=True: must be a number, not a bool"),
                                    (dict(weights=[1.0], method="svd", svd_rank=True), "svd_rank=True")])
def test_combine_bools_are_not_numbers(kw, msg):
    model = _two()
    before = picture(model)
    with pytest.raises(ConfigError, match=msg):  # read as 1.0 / rank 1 before
        lorakit.combine_adapters(model, ["a"], new_name="c", **kw)
    assert_same(before, picture(model))


# -- save: a file lorakit itself would refuse -------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_adapter_refuses_nan_factors_and_writes_nothing(tmp_path, bad):
    model = with_adapter()
    lorakit.save_adapter(model, tmp_path / "ad", "a")
    files = tree(tmp_path)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora["a"].lora_B[0, 0] = bad
    # before: written, and then refused by load_adapter ("tensors hold NaN or inf")
    with pytest.raises(AdapterStateError, match=r"adapter 'a' not saved to .*NaN or inf.*layers\.1\.self_attn\.v_proj"
                                                r"\.lora_B\.weight"):
        lorakit.save_adapter(model, tmp_path / "ad", "a")
    with pytest.raises(AdapterStateError, match="NaN or inf"):
        lorakit.save_adapter(model, tmp_path / "new", "a")
    assert tree(tmp_path) == files


# -- PiSSA / OLoRA: factors from the weight ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["pissa", "pissa_niter_2", "olora"])
def test_weight_inits_with_a_rank_above_the_weights_directions(mode):
    model = tiny_llama()  # k_proj: (16, 32)
    before = picture(model)
    with pytest.raises(ConfigError, match=rf"init_lora_weights='{mode}' at module 'model\.layers\.0\.self_attn\.k_proj'"
                                          r": r=32 is more than the 16 directions .*at most 16"):
        lorakit.inject(model, lorakit.LoraConfig(r=32, target_modules=["k_proj"], init_lora_weights=mode))
    assert_same(before, picture(model))  # RuntimeError "shape '[32, 32]' is invalid" before


@pytest.mark.parametrize("mode", ["pissa", "olora"])
def test_weight_inits_on_a_non_finite_weight(mode):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = math.inf
    before = picture(model)
    with pytest.raises(ConfigError, match=r"k_proj': its weight holds NaN or inf values"):  # _LinAlgError before
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=mode))
    assert_same(before, picture(model))


def test_loftq_config_typo_is_named():
    with pytest.raises(ConfigError, match="loftq_config key 'loftq_itr': not a LoftQ setting \\(did you mean "
                                          "'loftq_iter'\\?\\)"):  # one iteration ran instead of 5, silently
        lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_itr": 5})


# -- chunked cross-entropy: inputs checked before the kernels -----------------------------------------------
def _heads():
    from torch import nn

    torch.manual_seed(0)
    trainable = nn.Linear(8, 20)
    frozen = nn.Linear(8, 20).requires_grad_(False)
    wrapped = tiny_llama()
    lorakit.inject(wrapped, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    return {"fused": trainable, "tiled": frozen, "checkpointed": wrapped.lm_head}


@pytest.mark.parametrize("path", ["fused", "tiled", "checkpointed"])
@pytest.mark.parametrize("case,msg", [
    ("float-labels", "labels must be an integer tensor of target ids .*got a torch.float32 tensor"),
    ("bool-labels", "labels must be an integer tensor .*torch.bool"),      # read as ids 0 / 1 before
    ("list-labels", "labels must be an integer tensor .*got a list"),
    ("int-hidden", "hidden must be a floating-point tensor .*torch.int64"),  # the head's weight was cast to int
    ("0d-hidden", r"hidden must be a floating-point tensor .*shape \(\)"),
    ("head-none", "head=None must be the output head module"),
    ("ignore-none", "ignore_index=None; give an integer"),
    ("ignore-float", "ignore_index=1.5"),
    ("wide-hidden", "hidden states have 9 features but the head .* takes"),
    ("label-vocab", r"label (20|100) is outside the head's vocabulary of (20|100)"),
    ("label-negative", "label -5 is outside the head's vocabulary"),
])
def test_chunked_ce_bad_inputs(path, case, msg):
    from lorakit.losses import chunked_cross_entropy

    head = _heads()[path]
    width, vocab = (32, 100) if path == "checkpointed" else (8, 20)
    h = torch.randn(2, 3, width, requires_grad=True)
    y = torch.randint(0, vocab, (2, 3))
    kw = {}
    if case == "float-labels":
        y = y.float()
    elif case == "bool-labels":
        y = y.bool()
    elif case == "list-labels":
        y = y.tolist()
    elif case == "int-hidden":
        h = torch.randint(0, 3, (2, 3, width))
    elif case == "0d-hidden":
        h, y = torch.tensor(1.0), torch.tensor(1)
    elif case == "head-none":
        head = None
    elif case in ("ignore-none", "ignore-float"):
        kw["ignore_index"] = None if case == "ignore-none" else 1.5
    elif case == "wide-hidden":
        h = torch.randn(2, 3, 9)
    elif case == "label-vocab":
        y[1, 2] = vocab
    elif case == "label-negative":
        y[0, 0] = -5
    # before: RuntimeError / IndexError / TypeError / AttributeError from torch, or a wrong loss
    with pytest.raises(ConfigError, match=f"chunked_cross_entropy: {msg}"):
        chunked_cross_entropy(h, head, y, **kw)


def test_chunked_ce_dtype_mismatch_on_a_wrapped_head_and_the_edge_cases_that_work():
    from torch import nn

    from lorakit.losses import chunked_cross_entropy

    head = _heads()["checkpointed"]
    with pytest.raises(ConfigError, match="hidden states are torch.float16 but the head LoraLayer's weight is "
                                          "torch.float32"):  # "mat1 and mat2 must have the same dtype" before
        chunked_cross_entropy(torch.randn(2, 3, 32).half(), head, torch.randint(0, 100, (2, 3)))
    lin = nn.Linear(4, 10)
    empty = chunked_cross_entropy(torch.randn(0, 5, 4), lin, torch.zeros(0, 5, dtype=torch.long), reduction="mean")
    ignored = chunked_cross_entropy(torch.randn(3, 4), lin, torch.full((3,), -100), reduction="mean")
    assert float(empty.detach()) == 0.0 and float(ignored.detach()) == 0.0
    y = torch.tensor([1, 7, 3], dtype=torch.int32)  # int32 ids are ids
    h = torch.randn(3, 4)
    ref = torch.nn.functional.cross_entropy(lin(h), y.long(), reduction="sum")
    torch.testing.assert_close(chunked_cross_entropy(h, lin, y), ref)


# -- GGUF metadata that transformers would reject with a raw error --------------------------------------------
def _gguf_with(path, **meta_changes):
    """A tiny dense (F32) Llama GGUF whose metadata keys (gguf-py's add_* names) are replaced by ``meta_changes``
    (None: left out)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from tests.quant.gguf_helpers import GGUF_OF, tiny_llama_model

    model = tiny_llama_model(0)
    cfg = model.config
    meta = dict(block_count=cfg.num_hidden_layers, context_length=cfg.max_position_embeddings,
                embedding_length=cfg.hidden_size, feed_forward_length=cfg.intermediate_size,
                head_count=cfg.num_attention_heads, head_count_kv=cfg.num_key_value_heads,
                layer_norm_rms_eps=cfg.rms_norm_eps, vocab_size=cfg.vocab_size)
    meta.update(meta_changes)
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in meta.items():
        if v is not None:
            getattr(w, f"add_{k}")(v)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype(np.float32))
    for i in range(cfg.num_hidden_layers):
        for hf, g in GGUF_OF.items():
            if f"model.layers.{i}.{hf}.weight" in sd:
                w.add_tensor(f"blk.{i}.{g}.weight", sd[f"model.layers.{i}.{hf}.weight"].astype(np.float32))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].astype(np.float32))
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"].astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


@pytest.mark.parametrize("meta,msg", [
    (dict(head_count=0), r"llama\.attention\.head_count=0 must be an integer ≥ 1"),      # ZeroDivisionError
    (dict(head_count_kv=0), r"llama\.attention\.head_count_kv=0 must be an integer ≥ 1"),  # ZeroDivisionError
    (dict(head_count=3), r"llama\.attention\.head_count=3 / head_count_kv=2 do not divide embedding_length"),  # transformers' ValueError
    (dict(layer_norm_rms_eps=-1.0), r"llama\.attention\.layer_norm_rms_epsilon=-1\.0 must be a finite number > 0"),
    (dict(context_length=0), r"llama\.context_length=0 must be an integer ≥ 1"),
])
def test_gguf_metadata_that_cannot_build_a_model(tmp_path, meta, msg):
    from lorakit.errors import QuantizationError
    from lorakit.quant.gguf_load import load_gguf

    path = _gguf_with(tmp_path / "m.gguf", **meta)
    for keep in (True, False):
        with pytest.raises(QuantizationError, match=rf"m\.gguf: metadata {msg}"):
            load_gguf(path, keep_quantized=keep)


def test_load_gguf_flag_and_dtype_types(tmp_path):
    from lorakit.errors import QuantizationError
    from lorakit.quant.gguf_load import load_gguf

    path = _gguf_with(tmp_path / "m.gguf")
    with pytest.raises(QuantizationError, match="keep_quantized='no': must be true or false"):  # read as True
        load_gguf(path, keep_quantized="no")
    with pytest.raises(QuantizationError, match="dtype=torch.int32: the dtype of the dense tensors"):  # int norms
        load_gguf(path, dtype=torch.int32)


# -- typed fields: the message names the wrong entry of a list / mapping -------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(columns={"instruction": 1}), r"columns=\{'instruction': 1\}: must be a mapping of strings to strings "
                                       r"\(entry 'instruction': 1 is not a string\)"),  # "(got a dict)" before
    (dict(report_to=["csv", 3]), r"report_to=\['csv', 3\]: must be a list of strings or null \(entry 1: 3 is not"),
    (dict(method_options={3: 1}), r"method_options=\{3: 1\}: must be a mapping of strings to values \(key 3"),
])
def test_trainargs_names_the_wrong_entry(kw, msg):
    from lorakit.train import TrainArgs

    with pytest.raises(ConfigError, match=f"TrainArgs {msg}"):
        TrainArgs(**kw)


def test_cli_dotted_column_override_names_the_entry(tmp_path, capsys):
    from lorakit.cli import main

    code = main(["train", "--data", "builtin:shift", "--output-dir", str(tmp_path / "o"), "columns.output=7"])
    err = capsys.readouterr().err
    assert code == 2 and "entry 'output': 7 is not a string" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# -- AdaLoRA's budget schedule: a public pure function ------------------------------------------------------
@pytest.mark.parametrize("kw,msg", [
    (dict(step="3"), "budget_schedule step='3'"), (dict(step=1.5), "budget_schedule step=1.5"),  # TypeError before
    (dict(step=-1), "budget_schedule step=-1"),                                                # b(0) returned
    (dict(deltaT=0), "budget_schedule deltaT=0"),                                              # ZeroDivisionError
    (dict(target_budget=20), "target_budget=20 is above init_budget=10"),                      # a growing "budget"
])
def test_budget_schedule_arguments(kw, msg):
    from lorakit.variants.adalora.schedule import budget_schedule

    args = dict(step=3, init_budget=10, target_budget=5, tinit=1, tfinal=1, total_step=10, deltaT=1, **{})
    args.update(kw)
    step = args.pop("step")
    with pytest.raises(ConfigError, match=msg):
        budget_schedule(step, **args)


@pytest.mark.parametrize("kw", [dict(use_dora=True), dict(init_lora_weights="pissa"), dict(init_lora_weights="olora")])
def test_fused_slices_refuse_what_the_sliced_kind_would_drop(kw):
    model = tiny_llama()
    before = picture(model)
    # before: a plain SlicedAdapter was made — no magnitude vector (DoRA) / no PiSSA factors, silently
    with pytest.raises(ConfigError, match="fused_slices and .* exclude each other"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"], fused_slices={"q_proj": [True, False]}, **kw))
    assert_same(before, picture(model))


def test_loha_file_rank_is_checked_before_allocation(tmp_path, monkeypatch):
    from lorakit.adapter_kinds.loha import LoHaAdapter
    from lorakit.errors import AdapterFileError

    model = tiny_llama()
    lorakit.inject(model, lorakit.LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False), "a")
    lorakit.save_adapter(model, tmp_path / "ad", "a")
    cfg = tmp_path / "ad" / "adapter_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "r": 60000}))
    made = []
    real = LoHaAdapter.__init__
    monkeypatch.setattr(LoHaAdapter, "__init__", lambda self, *a, **k: (made.append(a), real(self, *a, **k))[1])
    fresh = tiny_llama()
    before = picture(fresh)
    # before: four (32, 60000)-sized factors per module were allocated, then the shapes were compared
    with pytest.raises(AdapterFileError, match=r"q_proj: config rank 60000, file rank 2"):
        lorakit.load_adapter(fresh, tmp_path / "ad", "x")
    assert made == [] and before["adapters"] == []
    assert_same(before, picture(fresh))
