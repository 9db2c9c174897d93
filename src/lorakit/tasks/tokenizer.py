"""The embedded model's tokenizer: one token per character, as a transformers fast tokenizer.

Vocabulary (100 ids): ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, ``"\\n"`` 4, then the 95
printable ASCII characters (space .. ``~``) in code-point order. The tasks only use lowercase
letters, digits, space, ``=`` and newline; the rest is there so any English text tokenizes without
``<unk>`` (those rows of the embedding are untrained).

Like Llama's, the tokenizer prepends ``<s>`` and never appends ``</s>``; the chat template writes
both itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported when a tokenizer is built, not with lorakit.tasks
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
MODEL_MAX_LENGTH = 128

# User turns end with the prompt marker "=", assistant turns with the answer end "\n" and </s>, so
# to_messages(row) renders as bos + format_prompt(row) + format_answer(row) + eos (see format.py).
# A system turn is a line of its own. {% generation %} marks the assistant text for
# `return_assistant_tokens_mask=True`.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ message['content'] + '=' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '\\n' + eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer (the one saved in the embedded checkpoint)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}
    # A BPE model with no merges splits text into single characters; with no pre-tokenizer and no
    # normalizer, spaces and newlines are ordinary characters. Fuse() decodes by plain
    # concatenation (the default decoder would join tokens with spaces).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
