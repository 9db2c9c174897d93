"""Text generation for ``lorakit generate``: one loaded model, many prompts (a file, a session).

Chat or not is explicit: prompts are continued as raw text unless ``chat`` (``--chat``) or a system
message (``--system``, which implies chat) asks for the tokenizer's chat template. Raw is the default
because lorakit's own tasks are raw-text prompts (``"rev abc="``) and a template would change them.
A chat model given a raw prompt often ends its turn at once and prints nothing; :meth:`Generator.hint`
then says why and what to pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


class Generator:
    def __init__(self, net, tokenizer, max_new_tokens: int = 64, temperature: float = 0.0, chat: bool = False,
                 system: str | None = None, seed: int = 0):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r}: must be an integer ≥ 1.")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 <= temperature < float("inf"):  # also NaN, which every comparison fails; inf = uniform noise
            raise ConfigError(f"temperature={temperature}: must be a finite number ≥ 0 (0 = greedy).")
        self.chat = chat or system is not None
        if self.chat and not tokenizer.chat_template:
            what = "--system" if system is not None else "--chat"
            raise ConfigError(f"{what} needs a tokenizer with a chat template; this model's has none. "
                              "Drop it and write the prompt in the model's own format.")
        self.net, self.tokenizer, self.system, self.seed = net, tokenizer, system, seed
        self.kwargs: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                                       "pad_token_id": tokenizer.pad_token_id}
        if temperature > 0:
            self.kwargs["temperature"] = temperature

    def inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        if not self.chat:
            return self.tokenizer(prompt, return_tensors="pt")
        messages = [{"role": "user", "content": prompt}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                                  return_tensors="pt")

    @torch.inference_mode()
    def __call__(self, prompt: str) -> str:
        """The continuation of ``prompt`` (greedy unless temperature > 0; sampling seeded per call)."""
        ids = self.inputs(prompt)
        torch.manual_seed(self.seed)
        out = self.net.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], **self.kwargs)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    def hint(self, text: str) -> str | None:
        """Why ``text`` is empty, when the likely reason is a chat model prompted without its template."""
        if text.strip() or self.chat or not self.tokenizer.chat_template:
            return None
        return ("the model generated nothing (it ended the text at once). This model has a chat template: "
                "chat models answer prompts wrapped in it — pass --chat (and --system TEXT for a system message).")


def read_prompts(path: str) -> list[str]:
    """One prompt per line of ``path``; blank lines are skipped. A literal ``\\n`` stays two characters."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(f"--file {path} {what}; pass a text file with one prompt per line.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--file {path} is not UTF-8 text (byte {exc.start}); pass a text file with one prompt "
                          "per line.") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--file {path} holds no prompt; write one prompt per line.")
    return prompts
