"""Learning vs forgetting on a real chat model (``python -m lorakit.eval.study``).

Where ``lorakit.eval.forgetting`` compares methods on the embedded model's built-in exact-match tasks,
this study fine-tunes a real instruct model (SmolLM2-135M-Instruct by default) on a skill built from
Python's ``unicodedata`` tables, and measures what the base model loses on text and prompts nobody
trained on: ``data`` builds the sets, ``scores`` scores a model, ``runs`` fine-tunes one method,
``run`` drives the study, ``report`` writes the page and the Pareto plot. See
docs/results/STUDY_SMOLLM2.md.
"""
