"""LoRA variants: training-time parts of adapter kinds (the kinds themselves are in the core,
``lorakit.adapter_kinds``) and transforms that are not adapter kinds.

* ``loraplus``  — optimizer parameter groups (B's learning rate = ratio × A's)
* ``adalora``   — rank allocator, budget schedule, regulariser, hook (adapter kind: SVD form)
* ``olora``     — continual learning: loss term, task sequencing (adapter kind: past + new factors)
* ``expand``    — LLaMA-Pro block expansion (a model transform)
* ``sdft``      — self-distillation of a data file (a data transform)
"""
