"""Which way of marking row boundaries (``packing.MODES``) a model honours, found by trying it.

Whether a model reads packed ``position_ids`` depends on its modelling code, its attention
implementation and its transformers version, so lorakit does not keep a list: before training it runs
three short random rows once separately and once packed into one sequence (model in eval mode, no
gradients, the global RNG untouched) and keeps the first mode whose logits match the separate runs. A
row that could see its neighbour changes its logits by a large fraction of their size (on the tiny test
models 50-80 %), far above the tolerance. A model where neither mode matches is refused.
"""

from __future__ import annotations

import torch

from ..data.packing import MODES, collate_packed
from ..errors import ConfigError

_LENGTHS = (5, 7, 3)


def mask_dtype_for(model: torch.nn.Module) -> torch.dtype:
    """sdpa takes a boolean mask; eager attention adds the mask to its scores, so it needs 0 / -big."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return torch.bool if impl == "sdpa" else torch.float32


@torch.no_grad()
def packing_mode(model: torch.nn.Module, device: torch.device | str = "cpu", pad_id: int = 0) -> str:
    """The first mode of ``packing.MODES`` under which packed rows give the logits of the rows run
    alone; ``ConfigError`` when none does."""
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if not vocab:
        raise ConfigError("packing=true: this model exposes no input embeddings, so lorakit cannot check "
                          "that packed rows stay apart; drop packing.")
    g = torch.Generator().manual_seed(1234)
    rows = [torch.randint(0, vocab, (n,), generator=g) for n in _LENGTHS]
    example = {"input_ids": torch.cat(rows).tolist(), "labels": torch.cat(rows).tolist(), "seq_lens": list(_LENGTHS)}
    was_training = model.training
    model.eval()
    failures = []
    try:
        alone = torch.cat([model(input_ids=r[None].to(device)).logits[0].float() for r in rows])  # (ΣL, V)
        scale = float(alone.abs().max())
        for mode in MODES:
            batch = collate_packed([example], pad_id, mode, mask_dtype_for(model))
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            batch.pop("labels")
            try:
                packed = model(**batch).logits[0].float()  # (ΣL, V)
            except (TypeError, ValueError, RuntimeError) as exc:  # the model rejects the inputs
                failures.append(f"{mode}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            diff = float((packed - alone).abs().max())
            if diff <= 1e-5 + 1e-3 * scale:
                return mode
            failures.append(f"{mode}: logits differ by {diff:.3g} (scale {scale:.3g})")
    finally:
        model.train(was_training)
    raise ConfigError(
        f"packing=true: {type(model).__name__} does not keep packed rows apart — " + "; ".join(failures)
        + ". Its attention ignores restarting position_ids and explicit 4-D masks, so rows would attend to "
        "each other. Drop packing (rows are then padded per micro-batch).")
