"""The forgetting probe: how far the model has drifted from the base on prompts it was not trained on.

Every ``probe_every`` steps the hook runs a fixed set of probe rows (prompts and the *base model's own*
answers, e.g. ``variants/self_replay.py``'s Magpie prompts) through the model twice, without gradients:
once with the adapters disabled (the base) and once as it is now, and logs over the answer tokens

    probe_kl     mean per-token KL(p_base ‖ p_model)        0 at the start; grows as the model forgets
    probe_agree  fraction of tokens where both argmaxes agree   1 at the start

With ``probe_max_kl`` set, a KL above it warns once (``probe_action="warn"``) or ends the run cleanly
after that step (``"stop"``: the adapter of that step is saved and scored as usual). The base needs no
copy of the model: ``lorakit.disabled`` switches the adapters off for the base pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..adapters import disabled
from ..errors import ConfigError
from ..data.batches import collate
from ..data.encode import IGNORE
from .hooks import BaseHook, HookContext


class ForgettingProbe(BaseHook):
    def __init__(self, examples: list[dict[str, Any]], pad_id: int, every: int, max_kl: float | None = None,
                 action: str = "warn", say=print):
        if not examples:
            raise ConfigError("forgetting probe: no probe rows; give the probe prompts (self-replay writes them).")
        if every <= 0:
            raise ConfigError(f"probe_every={every}: must be a positive number of steps.")
        if action not in ("warn", "stop"):
            raise ConfigError(f"probe_action={action!r}: use 'warn' or 'stop'.")
        self.batch = collate(examples, pad_id)
        self.every, self.max_kl, self.action, self.say = every, max_kl, action, say
        self.warned = False

    @torch.no_grad()
    def measure(self, model) -> dict[str, float]:
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        b = {k: v.to(device) for k, v in self.batch.items()}
        labels = b.pop("labels")[:, 1:]  # (B, T-1): the answer tokens are the ones that are not IGNORE
        keep = labels != IGNORE
        try:
            with disabled(model):
                base = F.log_softmax(model(**b).logits[:, :-1].float(), -1)[keep]  # (n, V)
            cur = F.log_softmax(model(**b).logits[:, :-1].float(), -1)[keep]
        finally:
            model.train(was)
        kl = (base.exp() * (base - cur)).sum(-1).mean()
        agree = (base.argmax(-1) == cur.argmax(-1)).float().mean()
        return {"probe_kl": float(kl), "probe_agree": float(agree)}

    def after_step(self, ctx: HookContext) -> None:
        if (ctx.step + 1) % self.every:
            return
        result = self.measure(ctx.model)
        ctx.log.update(result)
        if self.max_kl is None or result["probe_kl"] <= self.max_kl:
            return
        msg = (f"forgetting probe at step {ctx.step + 1}: KL to the base {result['probe_kl']:.4f} > "
               f"probe_max_kl={self.max_kl} (token agreement {result['probe_agree']:.1%})")
        if self.action == "stop":
            ctx.stop_reason = msg + "; stopping here (probe_action=stop)."
        elif not self.warned:
            self.warned = True
            self.say(msg + ". Lower lr or steps, or raise replay, to keep more of the base.")
