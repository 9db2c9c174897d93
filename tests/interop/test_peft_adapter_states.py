"""Differential test: lorakit's multi-adapter state machine against PEFT 0.21's, operation by operation.

Three LoRA adapters written by PEFT (random non-zero A and B; ``it`` adapts fewer modules than ``de`` and
``fr``) are loaded into lorakit and into a ``PeftModel``. Hand-picked sequences and 50 seeded random ones
(set_adapter with a name or a list, merge, unmerge, delete_adapter, load_adapter, the disabled block,
per-row adapters, merge_and_unload, unload; unknown names included) run on both. After every operation:

* the adapters, the active adapters (model and per layer) and the merged adapters (per layer) agree;
* lorakit's output equals ``REF[merged ∪ active]``: a third model (PEFT, every adapter unmerged) running
  exactly those adapters — an independent reference — and PEFT's own output equals what PEFT does;
* lorakit warns about an unmerge, or about a successor to a deleted active adapter, exactly when PEFT does;
* where PEFT raises, lorakit raises the ``LorakitError`` subclass named in ``PEFT_ERRORS`` and the model is
  exactly as before (state dict, output, adapter states).

lorakit's deliberate differences (docs/ADAPTER_STATES.md) are spelled out where the driver meets them
(``lorakit_refuses``, the forward with merged layers, the disabled block, unload) and tested on their own
at the end.
"""

from __future__ import annotations

import copy
import itertools
import random
import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from peft_models import MODELS, assert_close, output, peft, peft_config, perturb

import lorakit
from lorakit.errors import AdapterNotFoundError, AdapterStateError, ConfigError, LorakitError
from lorakit.layers.host import LoraLayer

from conftest import tiny_llama


def MAKE():  # one decoder layer: the sequences copy the models ~60 times, so every module counts
    return tiny_llama(layers=1)


INPUTS = MODELS["llama"][1]
SPECS = {  # sorted names: "it" (fewest targets) is never the successor PEFT picks per layer differently
    "de": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
    "fr": dict(target_modules=["q_proj", "v_proj"], r=2, lora_alpha=4),
    "it": dict(target_modules=["q_proj"], r=3, lora_alpha=3),
}
NAMES = tuple(SPECS)
MISSING = "zz"
# PEFT's error message → the LorakitError lorakit must raise (its message names the adapter)
PEFT_ERRORS = [
    (r"does not exist|not found|non-existing", AdapterNotFoundError),
    (r"while they are merged|there are merged adapters", AdapterStateError),
    (r"already exists", ConfigError),
]
PEFT_UNMERGE_WARNING = "Adapter cannot be set when the model is merged"
PEFT_SUCCESSOR_WARNING = "was active which is now deleted"


@dataclass(frozen=True)
class Op:
    kind: str  # set | merge | unmerge | delete | add | disabled | rows | merge_and_unload | unload
    arg: object = None  # a name, a list of names, None (merge: the active adapters); rows: a name per row

    def __repr__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}({self.arg!r})"


TERMINAL = ("merge_and_unload", "unload")


# -- the three models ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, kw) in enumerate(SPECS.items()):
        pm = peft.get_peft_model(MAKE(), peft_config(**kw), adapter_name=name)
        perturb(pm, seed=10 + i, scale=0.3)  # A and B random, non-zero
        pm.save_pretrained(root)  # root/<name>/ (PEFT puts a non-default adapter in a subfolder)
    return {n: root / n for n in NAMES}


def load_peft(files, names=NAMES):
    pm = peft.PeftModel.from_pretrained(MAKE(), files[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(files[n], adapter_name=n)
    return pm.eval()


@pytest.fixture(scope="module")
def ref(files):
    """REF[frozenset of names] = the output with exactly those adapters' updates (none merged)."""
    pm = load_peft(files)
    out = {}
    for k in range(len(NAMES) + 1):
        for subset in itertools.combinations(NAMES, k):
            pm.base_model.set_adapter(list(subset))
            out[frozenset(subset)] = output(pm, INPUTS())
    assert all(not torch.allclose(out[frozenset()], out[frozenset([n])]) for n in NAMES)  # each adapter matters
    return out


@pytest.fixture(scope="module")
def start(files):
    """lorakit's and PEFT's model with the three adapters, "de" active; copied for every sequence."""
    theirs = load_peft(files)
    theirs.set_adapter("de")
    ours = MAKE()
    for n in NAMES:
        lorakit.load_adapter(ours, files[n], n)
    lorakit.set_adapter(ours, "de")
    return ours, theirs


# -- reading the states -------------------------------------------------------------------------------
def peft_layers(pm):
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {p.removeprefix("base_model.model."): m for p, m in pm.named_modules() if isinstance(m, PeftLoraLayer)}


def states(model, theirs: bool):
    """(adapters, active, {layer: (active there, merged there)}) — layers without adapters left out (PEFT
    keeps an emptied layer, lorakit puts the base module back)."""
    if theirs:
        pm = model
        layers = {p: ([n for n in m.active_adapters if n in m.lora_A], sorted(m.merged_adapters))
                  for p, m in peft_layers(pm).items() if len(m.lora_A)}
        return sorted(pm.peft_config), list(pm.base_model.active_adapters), layers
    layers = {p: (list(m.active), sorted(m.merged)) for p, m in model.named_modules() if isinstance(m, LoraLayer)}
    return sorted(lorakit.list_adapters(model)), lorakit.active_adapters(model), layers


def merged_set(model) -> set[str]:
    return set(lorakit.merged_adapters(model))


# -- one operation on each side ---------------------------------------------------------------------
def lorakit_refuses(ours, op: Op) -> bool:
    """Deliberate differences: lorakit refuses (AdapterNotFoundError, nothing changed) where PEFT goes on
    silently — an unknown name in a list (set_adapter) or in merge's names (PEFT skips it), and merging a
    model whose adapters were all deleted (lorakit cannot tell it from a model never injected)."""
    names = [op.arg] if isinstance(op.arg, str) else op.arg
    if op.kind == "set" and isinstance(op.arg, list):
        return any(n not in lorakit.list_adapters(ours) for n in names)
    if op.kind in ("merge", "merge_and_unload"):
        if op.arg is None:
            return not lorakit.list_adapters(ours)
        return any(n not in lorakit.list_adapters(ours) for n in names)
    return False


def run_peft(pm, op: Op, files):
    """Apply ``op`` to PEFT's model the way a PEFT user would; returns (the model, output inside a disabled
    block or None)."""
    inside = None
    if op.kind == "set":
        if isinstance(op.arg, str):
            pm.set_adapter(op.arg)  # PeftModel: ValueError for an unknown name
        else:
            pm.base_model.set_adapter(op.arg)  # PeftModel.set_adapter takes one name
    elif op.kind == "merge":
        pm.base_model.merge_adapter(adapter_names=op.arg)
    elif op.kind == "unmerge":
        pm.base_model.unmerge_adapter()
    elif op.kind == "delete":
        pm.delete_adapter(op.arg)
    elif op.kind == "add":  # lorakit.load_adapter = PEFT's load_adapter + set_adapter
        if op.arg in pm.peft_config:
            pm.add_adapter(op.arg, peft.LoraConfig.from_pretrained(files[op.arg]))  # ValueError: already exists
        pm.load_adapter(files[op.arg], adapter_name=op.arg)
        pm.set_adapter(op.arg)
    elif op.kind == "disabled":
        merged = sorted({n for m in peft_layers(pm).values() for n in m.merged_adapters})
        pm.base_model.disable_adapter_layers()  # PeftModel.disable_adapter() for LoRA, without its active_adapter
        try:
            inside = output(pm.base_model, INPUTS())
        finally:
            pm.base_model.enable_adapter_layers()
        # PEFT's forward unmerged every merged layer inside the block and leaves them unmerged; lorakit
        # merges them again on exit (deliberate): follow lorakit's rule so the sequence goes on alike.
        assert not any(m.merged for m in peft_layers(pm).values())
        if merged:
            pm.base_model.merge_adapter(adapter_names=merged)
    elif op.kind == "rows":  # PeftModel's forward(adapter_names=...), on the LoraModel
        try:
            with pm.base_model._enable_peft_forward_hooks(adapter_names=["__base__" if n is None else n
                                                                        for n in op.arg]):
                inside = output(pm.base_model, INPUTS())
        except ValueError:
            # PEFT removes its per-row hooks after the block without try/finally: a forward that raises
            # (merged adapters) leaves them on every layer and later forwards still split the rows
            for m in peft_layers(pm).values():
                m._forward_pre_hooks.clear()
            raise
    elif op.kind == "merge_and_unload":
        pm = pm.merge_and_unload(adapter_names=op.arg)
    elif op.kind == "unload":
        pm = pm.unload()
    return pm, inside


def run_lorakit(model, op: Op, files):
    inside = None
    if op.kind == "set":
        lorakit.set_adapter(model, op.arg)
    elif op.kind == "merge":
        lorakit.merge(model, op.arg)
    elif op.kind == "unmerge":
        lorakit.unmerge(model)
    elif op.kind == "delete":
        lorakit.delete_adapter(model, op.arg)
    elif op.kind == "add":
        lorakit.load_adapter(model, files[op.arg], op.arg)
    elif op.kind == "disabled":
        with lorakit.disabled(model):
            inside = output(model, INPUTS())
    elif op.kind == "rows":
        with lorakit.per_row_adapters(model, list(op.arg)):
            inside = output(model, INPUTS())
    elif op.kind == "merge_and_unload":
        model = lorakit.merge_and_unload(model, op.arg)
    elif op.kind == "unload":
        model = lorakit.unload(model)
    return model, inside


def recorded(fn):
    """(fn's result or None, the exception or None, the warning messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, error = fn(), None
        except (ValueError, TypeError, KeyError) as exc:  # PEFT's errors
            result, error = None, exc
    return result, error, [str(w.message) for w in caught]


def snapshot(model):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return sd, output(model, INPUTS()), states(model, theirs=False)


def assert_unchanged(model, before) -> None:
    sd, out, st = before
    now = model.state_dict()
    assert now.keys() == sd.keys()
    assert all(torch.equal(now[k], v) for k, v in sd.items()), "a refused call changed a tensor"
    assert torch.equal(output(model, INPUTS()), out)
    assert states(model, theirs=False) == st


def step(ours, theirs, op: Op, files, ref):
    """Apply ``op`` to both and check everything; returns the (possibly new) models."""
    where = f"after {op!r}"
    if lorakit_refuses(ours, op):
        before = snapshot(ours)
        with pytest.raises(AdapterNotFoundError, match="adapter"):
            run_lorakit(ours, op, files)
        assert_unchanged(ours, before)
        return ours, theirs
    merged_before = merged_set(ours)
    active_before = lorakit.active_adapters(ours)
    got_theirs, peft_error, peft_warnings = recorded(lambda: run_peft(theirs, op, files))
    if peft_error is not None:
        cls = next(c for pattern, c in PEFT_ERRORS if re.search(pattern, str(peft_error)))
        before = snapshot(ours)
        with pytest.raises(cls, match=re.escape(repr(op.arg)) if isinstance(op.arg, str) else None):
            run_lorakit(ours, op, files)
        assert_unchanged(ours, before)
        return ours, theirs
    theirs, inside_theirs = got_theirs
    got_ours, our_error, our_warnings = recorded(lambda: run_lorakit(ours, op, files))
    assert our_error is None, f"{where}: lorakit raised {our_error!r} where PEFT did not"
    ours, inside_ours = got_ours
    # the same warnings (an unmerge on switching, a successor for a deleted active adapter)
    assert any(PEFT_UNMERGE_WARNING in w for w in peft_warnings) == any("unmerges them first" in w
                                                                        for w in our_warnings), where
    assert any(PEFT_SUCCESSOR_WARNING in w for w in peft_warnings) == any("is active now" in w
                                                                          for w in our_warnings), where
    if op.kind in TERMINAL:
        assert not any("lorakit" in type(m).__module__ for m in ours.modules()), where
        assert not any("peft" in type(m).__module__ for m in theirs.modules()), where
        assert lorakit.list_adapters(ours) == []
        named = set(active_before if op.arg is None else op.arg)
        if op.kind == "merge_and_unload":
            assert_close(output(ours, INPUTS()), ref[frozenset(merged_before | named)])
            assert_close(output(theirs, INPUTS()), ref[frozenset(merged_before | named)])
        else:  # unload: lorakit gives the original weights back; PEFT keeps merged updates in them (deliberate)
            assert_close(output(ours, INPUTS()), ref[frozenset()])
            assert_close(output(theirs, INPUTS()), ref[frozenset(merged_before)])
        return ours, theirs
    assert states(ours, theirs=False) == states(theirs, theirs=True), where
    if op.kind == "disabled":
        assert_close(inside_ours, ref[frozenset()])
        assert_close(inside_theirs, ref[frozenset()])
    if op.kind == "rows":  # row i runs adapter op.arg[i] alone (None: the base)
        want = torch.stack([ref[frozenset({n} - {None})][i] for i, n in enumerate(op.arg)])
        assert_close(inside_ours, want)
        assert_close(inside_theirs, want)
    merged, active = merged_set(ours), lorakit.active_adapters(ours)
    # PEFT's LoraModel: PeftModel.forward reads its own active_adapter, which PEFT leaves naming a deleted
    # adapter after set_adapter(list) + delete_adapter (KeyError); the LoraModel runs the same layers
    y_ours, y_theirs = output(ours, INPUTS()), output(theirs.base_model, INPUTS())
    assert_close(y_ours, ref[frozenset(merged) | frozenset(active)])
    if not merged or set(active) <= merged:
        assert_close(y_theirs, y_ours)
    # else: a PEFT layer holding a merged adapter runs its (merged) base only and skips active, unmerged
    # adapters, while a layer without one runs them — lorakit runs every active adapter (deliberate)
    return ours, theirs


def run_sequence(start, files, ref, ops):
    ours, theirs = copy.deepcopy(start[0]), copy.deepcopy(start[1])
    for i, op in enumerate(ops):
        try:
            ours, theirs = step(ours, theirs, op, files, ref)
        except AssertionError as exc:
            raise AssertionError(f"sequence {ops} at step {i} ({op!r}): {exc}") from None
        if op.kind in TERMINAL:
            break


# -- the sequences -------------------------------------------------------------------------------------
S, M, U, D, A = (lambda arg=None, k=k: Op(k, arg) for k in ("set", "merge", "unmerge", "delete", "add"))
HAND_PICKED = {
    "set_after_merge": [M(), S("fr"), M(), S(["de", "fr"]), M(), S("de")],
    "set_same_after_merge": [M(), S("de"), M(), U(), U()],
    "set_missing_while_merged": [M(), S(MISSING), S(["fr", MISSING]), S([]), M()],
    "merge_two_then_delete_one": [S(["de", "fr"]), M(), D("fr"), U(), D("fr"), M()],
    "add_while_merged": [M(), D("it"), A("it"), M(), A("de")],
    "disabled_while_merged": [M(), Op("disabled"), S("fr"), Op("disabled")],
    "merge_a_non_active_adapter": [M(["fr"]), Op("disabled"), U(), M(["it", "fr"]), S("de")],
    "delete_active": [D("de"), D("fr"), A("de"), S([]), D("de"), D("it"), S("de"), M(), D("fr")],
    "delete_one_of_two_active": [S(["fr", "de"]), D("de"), M(), Op("merge_and_unload")],
    "merge_and_unload_names": [S("it"), M(), Op("merge_and_unload", ["fr"])],
    "merge_and_unload_missing": [Op("merge_and_unload", [MISSING]), Op("merge_and_unload", ["de", "fr"])],
    "unload_inactive": [S("fr"), Op("unload")],
    "unload_merged": [M(["fr"]), S(["de", "it"]), M(), Op("unload")],
    "rows_while_merged": [Op("rows", ("fr", None)), M(), Op("rows", ("de", "it")), U(), Op("rows", (MISSING, None)),
                          Op("rows", ("it", "it"))],
    "set_list_order": [S(["it", "de"]), M(["de"]), M(), U(), S(["fr", "it", "de"])],
}


@pytest.mark.parametrize("name", sorted(HAND_PICKED))
def test_hand_picked_sequences(name, start, files, ref):
    run_sequence(start, files, ref, HAND_PICKED[name])


def random_op(rng: random.Random) -> Op:
    def name():
        return MISSING if rng.random() < 0.1 else rng.choice(NAMES)

    def names():
        return sorted({name() for _ in range(rng.randint(0, 3))}, key=lambda n: rng.random())

    kind = rng.choices(["set", "set-list", "merge", "merge-names", "unmerge", "delete", "add", "disabled", "rows",
                        "merge_and_unload", "unload"], weights=[16, 10, 12, 8, 10, 12, 10, 6, 6, 3, 2])[0]
    if kind == "set-list":
        return Op("set", names())
    if kind == "merge-names":
        return Op("merge", names())
    if kind == "rows":  # INPUTS() has two rows
        return Op(kind, tuple(rng.choice([*NAMES, None]) if rng.random() > 0.05 else MISSING for _ in range(2)))
    if kind == "merge_and_unload":
        return Op(kind, rng.choice([None, names()]))
    if kind == "add":
        return Op(kind, rng.choice(NAMES))  # a file of each adapter; an existing name is refused by both
    return Op(kind, name() if kind in ("set", "delete") else None)


RANDOM = [[random_op(rng) for _ in range(rng.randint(4, 8))] for rng in [random.Random(2026)] for _ in range(50)]


@pytest.mark.parametrize("chunk", range(5))
def test_random_sequences(chunk, start, files, ref):
    for ops in RANDOM[chunk::5]:
        run_sequence(start, files, ref, ops)


# -- PEFT's rules lorakit now follows, with its messages ------------------------------------------------
def test_set_adapter_after_merge_unmerges_with_a_warning(start, ref):
    ours = copy.deepcopy(start[0])
    lorakit.merge(ours)
    with pytest.warns(UserWarning, match=r"adapters \['de'\] are merged .* activating \['fr'\] unmerges them first"
                                         r".*lorakit.merge\(model\)"):
        lorakit.set_adapter(ours, "fr")
    assert lorakit.merged_adapters(ours) == [] and lorakit.active_adapters(ours) == ["fr"]
    assert_close(output(ours, INPUTS()), ref[frozenset({"fr"})])


def test_delete_merged_adapter_names_it_and_the_fix(start):
    ours = copy.deepcopy(start[0])
    lorakit.set_adapter(ours, ["de", "fr"])
    lorakit.merge(ours)
    before = snapshot(ours)
    with pytest.raises(AdapterStateError, match=r"adapter 'fr' is merged .*lorakit.unmerge\(model\)"):
        lorakit.delete_adapter(ours, "fr")
    assert_unchanged(ours, before)


def test_deleting_the_active_adapter_activates_the_first_remaining(start, ref):
    ours = copy.deepcopy(start[0])
    with pytest.warns(UserWarning, match=r"deleted adapter 'de' was the active one; 'fr' .* is active now"):
        lorakit.delete_adapter(ours, "de")
    assert lorakit.active_adapters(ours) == ["fr"]
    assert_close(output(ours, INPUTS()), ref[frozenset({"fr"})])


def test_a_failed_load_while_merged_leaves_weights_and_merges(start, files, tmp_path):
    """The load's unmerge comes after its checks: a file that does not fit changes nothing."""
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(files["fr"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 5}))  # tensors have r = 2
    ours = copy.deepcopy(start[0])
    lorakit.delete_adapter(ours, "fr")
    lorakit.merge(ours)
    before = snapshot(ours)
    with pytest.raises(LorakitError, match="bad"):
        lorakit.load_adapter(ours, bad, "fr")
    assert_unchanged(ours, before)


# -- deliberate differences (docs/ADAPTER_STATES.md) ---------------------------------------------------
def test_merged_layers_still_run_the_other_active_adapters(start, ref):
    """PEFT: a layer with a merged adapter runs only its base (the active, unmerged 'de' is skipped)."""
    ours, theirs = copy.deepcopy(start[0]), copy.deepcopy(start[1])
    lorakit.merge(ours, ["fr"])
    theirs.base_model.merge_adapter(adapter_names=["fr"])
    assert_close(output(ours, INPUTS()), ref[frozenset({"de", "fr"})])
    assert_close(output(theirs.base_model, INPUTS()), ref[frozenset({"fr"})])


def test_disabled_block_merges_again_on_exit(start):
    """PEFT's forward inside disable_adapter() unmerges every merged layer, and they stay unmerged."""
    ours, theirs = copy.deepcopy(start[0]), copy.deepcopy(start[1])
    lorakit.merge(ours)
    theirs.base_model.merge_adapter()
    with lorakit.disabled(ours):
        output(ours, INPUTS())
    with theirs.disable_adapter():
        output(theirs, INPUTS())
    assert lorakit.merged_adapters(ours) == ["de"]
    assert not any(m.merged for m in peft_layers(theirs).values())


def test_unload_gives_the_original_weights_back_even_when_merged(start, ref):
    ours, theirs = copy.deepcopy(start[0]), copy.deepcopy(start[1])
    lorakit.merge(ours)
    theirs.base_model.merge_adapter()
    assert_close(output(lorakit.unload(ours), INPUTS()), ref[frozenset()])
    assert_close(output(theirs.unload(), INPUTS()), ref[frozenset({"de"})])  # PEFT keeps the merged update


@pytest.mark.parametrize("call", [
    lambda m: lorakit.set_adapter(m, ["fr", MISSING]),
    lambda m: lorakit.merge(m, ["fr", MISSING]),
    lambda m: lorakit.merge_and_unload(m, [MISSING]),
])
def test_unknown_names_in_a_list_are_refused(start, call):
    """PEFT's LoraModel.set_adapter(list) activates an unknown name and merge(adapter_names) skips it."""
    ours = copy.deepcopy(start[0])
    lorakit.merge(ours)
    before = snapshot(ours)
    with pytest.raises(AdapterNotFoundError, match=f"no adapter named '{MISSING}'"):
        call(ours)
    assert_unchanged(ours, before)
    theirs = copy.deepcopy(start[1])
    theirs.base_model.set_adapter(["fr", MISSING])  # what PEFT does instead: no error
    theirs.base_model.merge_adapter(adapter_names=[MISSING])
    assert theirs.base_model.active_adapters == ["fr", MISSING]


def test_a_name_listed_twice_is_refused(start, ref):
    ours, theirs = copy.deepcopy(start[0]), copy.deepcopy(start[1])
    with pytest.raises(ConfigError, match=r"\['de'\] listed more than once"):
        lorakit.set_adapter(ours, ["de", "de"])
    theirs.base_model.set_adapter(["de", "de"])  # PEFT adds de's update twice
    assert not torch.allclose(output(theirs.base_model, INPUTS()), ref[frozenset({"de"})], atol=1e-3)


def test_merge_after_every_adapter_was_deleted_is_refused(start):
    ours = copy.deepcopy(start[0])
    lorakit.set_adapter(ours, [])  # no successor to choose
    for n in NAMES:
        lorakit.delete_adapter(ours, n)
    with pytest.raises(AdapterNotFoundError, match="no lorakit adapters"):
        lorakit.merge(ours)
    assert not any(isinstance(m, LoraLayer) for m in ours.modules())  # the plain model is back


def test_successor_is_chosen_for_the_whole_model(files):
    """PEFT picks a successor per layer (the first adapter *that layer* has), so layers can end up running
    different adapters; lorakit picks one name for the model and activates it where it exists."""
    from peft_models import lorakit_config

    ours = MAKE()
    lorakit.inject(ours, lorakit_config(target_modules=["v_proj"]), "b")
    lorakit.inject(ours, lorakit_config(target_modules=["q_proj"]), "c")
    lorakit.inject(ours, lorakit_config(target_modules=["q_proj", "v_proj"]), "a")
    with pytest.warns(UserWarning, match="'b'"):
        lorakit.delete_adapter(ours, "a")
    layers = states(ours, theirs=False)[2]
    assert lorakit.active_adapters(ours) == ["b"]
    assert {p.rpartition(".")[2]: act for p, (act, _) in layers.items()} == {"q_proj": [], "v_proj": ["b"]}


def test_switching_inside_a_disabled_block_leaves_the_merge_out(start, ref):
    """The block merges again on exit only if the active adapters did not change inside it: a set_adapter
    there leaves the model running exactly the new adapters, as set_adapter does outside."""
    ours = copy.deepcopy(start[0])
    lorakit.merge(ours)
    with lorakit.disabled(ours):
        lorakit.set_adapter(ours, "fr")
    assert lorakit.merged_adapters(ours) == [] and lorakit.active_adapters(ours) == ["fr"]
    assert_close(output(ours, INPUTS()), ref[frozenset({"fr"})])
    lorakit.merge(ours)
    with lorakit.disabled(ours):
        lorakit.set_adapter(ours, "fr")  # the same adapters: merged again
    assert lorakit.merged_adapters(ours) == ["fr"]
