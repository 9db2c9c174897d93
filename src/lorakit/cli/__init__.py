"""``lorakit``, the command line: ``app.py`` parses arguments and dispatches; ``options.py`` derives
flags, YAML recipes and ``key=value`` overrides from a config dataclass; ``commands.py`` holds the
eval / merge / generate / info commands as typed functions; ``forgetting.py``, ``image.py`` and
``export.py`` add their sub-commands. Nothing below the cli layer imports this package.
"""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
