"""The frozen text stream: LLM -> per-layer text K/V (deep fusion) or one layer's states (shallow).

The LLM is causal and never sees image tokens, so everything here is a pure function of the caption:
it can be computed once per caption (cache, inference) instead of once per denoising step.
We run the LLM's own transformers forward and record each shared layer's k/v projections with
hooks, so the text stream is exactly the pretrained model (Gemma-2's extra norms included).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from fusedit.errors import UserError
from fusedit.model.config import ModelConfig, TextModulation, TextSpec
from fusedit.model.presets import LLM_PRESETS, llm_config


@dataclass
class TextContext:
    """Right-padded text features of a batch. mask: (B, T) bool, True on real tokens."""

    mask: torch.Tensor
    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()  # per shared layer, (B, kv_heads, T, head_dim)
    states: torch.Tensor | None = None  # (B, T, llm_hidden)
    pooled: torch.Tensor | None = None  # (B, pooled_dim)
    # known on the host when the batch is made: no padding anywhere, so attention needs no mask
    # (and no device sync is spent finding that out)
    all_valid: bool = False

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def map(self, fn_seq, fn_batch=None, keeps_valid: bool = False) -> TextContext:
        """Apply fn_seq to every (B, ..., T, ...) tensor (with its sequence dim) and fn_batch to pooled."""
        return TextContext(
            mask=fn_seq(self.mask, 1),
            kv=tuple((fn_seq(k, 2), fn_seq(v, 2)) for k, v in self.kv),
            states=None if self.states is None else fn_seq(self.states, 1),
            pooled=None if self.pooled is None or fn_batch is None else fn_batch(self.pooled),
            all_valid=self.all_valid and keeps_valid,
        )

    def pad_to(self, length: int) -> TextContext:
        def pad(x, dim):
            extra = length - x.shape[dim]
            if extra <= 0:
                return x
            shape = list(x.shape)
            shape[dim] = extra
            return torch.cat([x, x.new_zeros(shape)], dim=dim)

        return replace(self.map(pad, keeps_valid=length <= self.mask.shape[1]), pooled=self.pooled)

    def trim(self) -> TextContext:
        """Drop padding columns that no sample in the batch needs."""
        n = int(self.lengths.max())
        return replace(self.map(lambda x, d: x.narrow(d, 0, n), keeps_valid=True), pooled=self.pooled)

    def to(self, *args, **kwargs) -> TextContext:
        """Tensor.to on every tensor; a dtype applies to the features, not to the bool mask (which moves)."""
        device = next((a for a in args if isinstance(a, str | torch.device)), kwargs.get("device"))

        def cast(x, dim=None):
            if x.dtype != torch.bool:
                return x.to(*args, **kwargs)
            return x if device is None else x.to(device, non_blocking=kwargs.get("non_blocking", False))

        return self.map(cast, cast, keeps_valid=True)

    @staticmethod
    def cat(items: list[TextContext]) -> TextContext:
        """Concatenate along the batch, padding to the longest text."""
        n = max(t.mask.shape[1] for t in items)
        items = [t.pad_to(n) for t in items]
        first = items[0]
        return TextContext(
            mask=torch.cat([t.mask for t in items]),
            kv=tuple(
                (torch.cat([t.kv[i][0] for t in items]), torch.cat([t.kv[i][1] for t in items]))
                for i in range(len(first.kv))
            ),
            states=None if first.states is None else torch.cat([t.states for t in items]),
            pooled=None if first.pooled is None else torch.cat([t.pooled for t in items]),
            all_valid=all(t.all_valid for t in items),
        )

    def where(self, drop: torch.Tensor, other: TextContext) -> TextContext:
        """Per sample: `other` (broadcast from one sample, e.g. the empty caption) where drop is True."""
        n = max(self.mask.shape[1], other.mask.shape[1])
        a, b = self.pad_to(n), other.pad_to(n)

        def pick(x, y, dim=None):
            d = drop.view(-1, *([1] * (x.dim() - 1)))
            return torch.where(d, y.expand_as(x) if y.shape[0] == 1 else y, x)

        return TextContext(
            mask=pick(a.mask, b.mask),
            kv=tuple((pick(ka, kb), pick(va, vb)) for (ka, va), (kb, vb) in zip(a.kv, b.kv, strict=True)),
            states=None if a.states is None else pick(a.states, b.states),
            pooled=None if a.pooled is None else pick(a.pooled, b.pooled),
            all_valid=a.all_valid and b.all_valid,
        )

    def select(self, index) -> TextContext:
        return self.map(lambda x, d: x[index], lambda x: x[index], keeps_valid=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor view, for saving and for equality checks."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("kv", "all_valid")}
        for i, (k, v) in enumerate(self.kv):
            out[f"k{i}"], out[f"v{i}"] = k, v
        return {k: v for k, v in out.items() if v is not None}


def _is_local(name_or_path: str) -> bool:
    """A path rather than a hub id ("org/name")."""
    return Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1


def llm_config_for(name_or_path: str):
    """The language model's transformers config: a preset when the name is one, else from its files."""
    from transformers import AutoConfig

    if name_or_path in LLM_PRESETS and not Path(name_or_path).exists():
        return llm_config(name_or_path)
    if _is_local(name_or_path) and not Path(name_or_path).is_dir():
        raise UserError(f"LLM not found: '{name_or_path}' is neither a directory nor a known preset")
    cfg = AutoConfig.from_pretrained(name_or_path)
    return getattr(cfg, "text_config", None) or cfg  # PaliGemma: its language model


def _truncate(llm: nn.Module, num_layers: int) -> nn.Module:
    """Keep the first num_layers decoder layers (later ones are never read)."""
    llm.layers = llm.layers[:num_layers]
    llm.config.num_hidden_layers = num_layers
    if getattr(llm.config, "layer_types", None):
        llm.config.layer_types = llm.config.layer_types[:num_layers]
    return llm


def load_llm(name_or_path: str, num_layers: int, dtype=torch.float32) -> nn.Module:
    """The frozen LLM's decoder stack (GemmaModel / Gemma2Model), from a hub id or a local directory."""
    from transformers import AutoModel

    llm_config_for(name_or_path)  # clear error for a missing path before transformers' own
    model = AutoModel.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True)  # never unpickle weights
    model = getattr(model, "language_model", model)  # PaliGemma -> its Gemma
    return _truncate(model, num_layers).eval().requires_grad_(False)


def build_llm_meta(name_or_path: str, num_layers: int) -> nn.Module:
    """The LLM on the meta device (shapes only), for parameter counts without any download."""
    from transformers import AutoModel

    cfg = llm_config_for(name_or_path)
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:num_layers]
    with torch.device("meta"):
        return AutoModel.from_config(cfg)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    if _is_local(name_or_path) and not Path(name_or_path).is_dir():
        raise UserError(f"tokenizer not found: '{name_or_path}' is not a directory")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:  # any loader failure is a bad path or checkpoint
        raise UserError(f"cannot load tokenizer {name_or_path!r}: {type(exc).__name__}: {exc}") from None
    tok.padding_side = "right"
    return tok


class PooledTextEncoder(nn.Module):
    """CLIP-like pooled embedding (`text_embeds`) for text modulation."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer

    @classmethod
    def load(cls, spec: TextModulation) -> PooledTextEncoder:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        sub = {"subfolder": spec.subfolder} if spec.subfolder else {}
        tsub = {"subfolder": spec.tokenizer_subfolder} if spec.tokenizer_subfolder else {}
        return cls(CLIPTextModelWithProjection.from_pretrained(spec.encoder, use_safetensors=True, **sub),
                   AutoTokenizer.from_pretrained(spec.encoder, **tsub))

    def forward(self, captions: list[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        batch = self.tokenizer(captions, padding="max_length", truncation=True,
                               max_length=self.tokenizer.model_max_length, return_tensors="pt").to(dev)
        return self.model(input_ids=batch.input_ids).text_embeds


class TextEncoder(nn.Module):
    """Captions (or token ids) -> TextContext, exactly as the reference's frozen text stream computes them.

    The shared layers run as the reference runs them: plain scaled-dot-product attention at scale
    head_dim^-0.5, so Gemma-2's attention-logit soft-capping is off there (text-only layers before them
    keep it); for the shipped Gemma-2 shapes query_pre_attn_scalar equals head_dim.
    """

    def __init__(self, llm: nn.Module, tokenizer, spec: TextSpec, pooled: PooledTextEncoder | None = None):
        super().__init__()
        self.llm, self.tokenizer, self.spec, self.pooled = llm, tokenizer, spec, pooled
        n_instr = len(tokenizer(spec.instruction, add_special_tokens=False).input_ids) if spec.instruction else 0
        self.max_length = spec.max_length + n_instr
        for i in spec.layers if spec.kind == "kv" else ():
            attn = llm.layers[i].self_attn
            attn.scaling = attn.head_dim**-0.5
            if hasattr(attn, "attn_logit_softcapping"):
                attn.attn_logit_softcapping = None

    @classmethod
    def load(cls, m: ModelConfig, spec: TextSpec, dtype=torch.float32) -> TextEncoder:
        """The frozen text stream a model config names: its LLM (truncated per spec), tokenizer, pooled encoder."""
        pooled = PooledTextEncoder.load(m.text_modulation) if m.text_modulation else None
        return cls(load_llm(m.llm, spec.llm_num_layers, dtype), load_tokenizer(m.tokenizer or m.llm), spec,
                   pooled).eval()

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask (padded to the longest caption, truncated to max_length), on the host."""
        batch = self.tokenizer([self.spec.instruction + c for c in captions], padding="longest",
                               truncation=True, max_length=self.max_length, return_tensors="pt")
        return batch.input_ids, batch.attention_mask.bool()

    @contextmanager
    def _record_kv(self):
        store: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for i in self.spec.layers:
            attn = self.llm.layers[i].self_attn
            for name in ("k_proj", "v_proj"):
                def hook(_m, _inp, out, key=(i, name)):
                    store[key] = out
                handles.append(getattr(attn, name).register_forward_hook(hook))
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, captions: list[str] | None = None) -> TextContext:
        """Right-padded ids and their mask (bool or the transformers 1/0 mask); captions feed the pooled encoder."""
        if self.pooled is not None and captions is None:
            raise UserError("this model's text modulation needs the captions (captions=...) for its pooled encoder")
        mask = mask.bool()
        all_valid = bool(mask.all()) if mask.device.type == "cpu" else False
        dev = self.llm.embed_tokens.weight.device
        input_ids, mask = input_ids.to(dev), mask.to(dev)
        pooled = self.pooled(captions) if self.pooled is not None else None
        if self.spec.kind == "hidden":
            out = self.llm(input_ids=input_ids, attention_mask=mask.long(), output_hidden_states=True)
            return TextContext(mask=mask, states=out.hidden_states[self.spec.hidden_index], pooled=pooled,
                               all_valid=all_valid)
        with self._record_kv() as store:
            self.llm(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
        cfg = self.llm.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        kv = []
        for i in self.spec.layers:
            k = store[i, "k_proj"].unflatten(-1, (-1, head_dim)).transpose(1, 2)
            v = store[i, "v_proj"].unflatten(-1, (-1, head_dim)).transpose(1, 2)
            if self.spec.rope_keys:
                cos, sin = self.llm.rotary_emb(k, pos)
                k = k * cos[:, None] + torch.cat([-k[..., head_dim // 2:], k[..., : head_dim // 2]], -1) * sin[:, None]
            kv.append((k, v))
        return TextContext(mask=mask, kv=tuple(kv), pooled=pooled, all_valid=all_valid)

    def encode(self, captions: list[str]) -> TextContext:
        ids, mask = self.tokenize(captions)
        return self(ids, mask, captions)
