"""Shell-style brace patterns for shard sets, with no I/O: `a-{000..002}.tar`, `{x,y}/b.tar`.

`storage.expand` applies them, then globs, directories and S3 prefixes."""
from __future__ import annotations

import re

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar a-001.tar a-002.tar (zero padding kept); `{x,y}` lists too.

    Groups expand left to right, like the shell.
    """
    found = [m for m in (_RANGE.search(pattern), _LIST.search(pattern)) if m]
    if not found:
        return [pattern]
    m = min(found, key=lambda x: x.start())
    head, tail = pattern[:m.start()], pattern[m.end():]
    if m.re is _LIST:
        return [x for alt in m.group(1).split(",") for x in expand_braces(head + alt + tail)]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    step = 1 if int(hi) >= int(lo) else -1
    return [x for i in range(int(lo), int(hi) + step, step) for x in expand_braces(f"{head}{i:0{width}d}{tail}")]
