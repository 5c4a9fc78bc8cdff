"""Reading prompt sources: local paths, s3:// URIs or http(s) URLs, with errors that name the line."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fusedit.components.shared import storage
from fusedit.errors import UserError


def read_text(uri: str, what: str) -> str:
    """The whole text of a file given by path, s3:// URI or http(s) URL."""
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri, timeout=60) as r:
                data = r.read()
        except OSError as exc:
            raise UserError(f"{what} {uri}: cannot download ({exc})") from None
    elif storage.is_s3(uri):
        data = storage.read_bytes(uri)
    else:
        if not Path(uri).is_file():
            raise UserError(f"{what} {uri}: no such file")
        data = Path(uri).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {uri}: not UTF-8 text") from None


def read_jsonl(uri: str, what: str, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(read_text(uri, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{what} {uri}: line {n} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or any(k not in row for k in required):
            raise UserError(f"{what} {uri}: line {n} must be a JSON object with {', '.join(required)}")
        rows.append(row)
    if not rows:
        raise UserError(f"{what} {uri}: no prompts")
    return rows


def check_names(pairs: list[tuple[str, str]], what: str, uri: str) -> list[tuple[str, str]]:
    """Prompt names become sample file names (`<name>.png` under the run's samples/): they must stay there."""
    for name, _ in pairs:
        if (not name or name.startswith(".") or any(c in name for c in "/\\\0")
                or not name.isprintable() or len(name.encode("utf-8", "surrogatepass")) > 200):
            raise UserError(f"{what} {uri}: prompt name {name!r} is not a plain file name "
                            "(no '/', '\\', leading '.', control characters; at most 200 bytes)")
    return pairs


def read_named_prompts(uri: str, what: str) -> list[tuple[str, str]]:
    """(name, prompt) pairs from a folder of <name>.txt, a CSV with item_id,text, a JSONL or a text file."""
    p = Path(uri)
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise UserError(f"{what} {uri}: folder has no .txt prompt files")
        out = [(f.stem, f.read_text(encoding="utf-8").strip()) for f in files]
    elif uri.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(read_text(uri, what))))
        if not rows or not {"item_id", "text"} <= set(rows[0]):
            raise UserError(f"{what} {uri}: CSV needs item_id and text columns (DPG-Bench's dpg_bench.csv)")
        out = list({r["item_id"]: r["text"].strip() for r in rows}.items())
    elif uri.endswith(".jsonl"):
        out = [(str(r.get("id", i)), r["prompt"]) for i, r in enumerate(read_jsonl(uri, what, ("prompt",)))]
    else:
        lines = [ln.strip() for ln in read_text(uri, what).splitlines() if ln.strip()]
        out = [(f"{i:05d}", ln) for i, ln in enumerate(lines)]
    bad = [n for n, t in out if not t]
    if bad:
        raise UserError(f"{what} {uri}: empty prompt for {bad[0]}")
    if not out:
        raise UserError(f"{what} {uri}: no prompts")
    return check_names(out, what, uri)
