"""A dataclass field's comment, read from its source: what `train/run.py --help` says of each flag.

The config sections (train/config.py, train/models/teacher_training.py) explain their fields in
comments beside or above them, for readers of the code; --help shows the same words, so a field is
explained in one place.
"""
from __future__ import annotations

import ast
import inspect
import io
import re
import textwrap
import tokenize


def field_comments(cls) -> dict:
    """Each field's comment in the dataclass's source: the comment lines right above it, else the
    comment at its line's end; fields with neither are left out."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen build): --help shows the defaults alone
        return {}
    lines = source.splitlines()
    comment_at = {t.start[0]: t.string.lstrip("#").strip()
                  for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    comments = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, line = [], node.lineno - 1
        while line in comment_at and lines[line - 1].strip().startswith("#"):
            above.insert(0, comment_at[line])
            line -= 1
        # a word hyphenated over two comment lines ("row-" / "standardised") is one word again
        comment = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(above)) or comment_at.get(node.lineno, "")
        if comment:
            comments[node.target.id] = comment
    return comments
