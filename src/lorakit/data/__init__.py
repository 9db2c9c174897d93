"""Training and evaluation data: reading files (``files.py``, with ``formats.py`` for other tools'
layouts, ``glue.py`` for GLUE files and ``guard.py`` for the byte-level checks), tokenizing rows into
examples (``encode.py``) and batching them (``batches.py``). Used by ``train`` and ``eval``; imports
only the core and ``tasks``.
"""
