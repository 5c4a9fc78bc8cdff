"""Helpers shared by the data tests: tiny shards, tar surgery, a small offline tokenizer."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def jpeg(size=(96, 80), color=(200, 40, 40), quality=90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard written with webdataset's own TarWriter (samples in the given order)."""
    import webdataset as wds

    with open(path, "wb") as f:
        w = wds.TarWriter(f, encoder=False, mtime=0)
        for key, members in samples:
            w.write({"__key__": key, **members})
        w.close()
    return path


def member_ends(path: Path) -> list[int]:
    """Byte offset just after each member's data (a cut there leaves whole members only)."""
    with tarfile.open(path) as t:
        return [m.offset_data + ((m.size + 511) // 512) * 512 for m in t.getmembers()]


def synth_defects(shard: Path) -> dict[str, str | None]:
    """key -> defect recorded in each sample's metadata (first occurrence of a key wins)."""
    out: dict[str, str | None] = {}
    with tarfile.open(shard) as t:
        for m in t.getmembers():
            if m.name.endswith(".json"):
                meta = json.load(t.extractfile(m))
                out.setdefault(m.name.split(".")[0], meta["defect"])
    return out


def build_tokenizer(path: Path, words: list[str]) -> Path:
    """A word-level tokenizer trained offline, saved so `AutoTokenizer.from_pretrained` loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(str(path))
    return path
