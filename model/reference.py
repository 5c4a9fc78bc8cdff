"""Import checkpoints written by the reference implementation (tang-bd/fuse-dit `save_pretrained`).

A reference transformer directory holds `config.json` (FuseDiTConfig: deep fusion, the LLM bundled as
`llm.*` and the DiT as `dit.*`; or DiTConfig: a shallow baseline, the DiT at the top level and its LLM
elsewhere) and `model.safetensors` (or shards listed in `model.safetensors.index.json`). A reference
pipeline directory adds `model_index.json`, `tokenizer/`, `scheduler/`, `vae/` (and `llm/` for the
shallow baselines, `clip/` + `clip_tokenizer/` for the text-modulation variant).

Every reference tensor lands in the project's model as it is or exactly re-parametrised:
- GemmaRMSNorm weights w become 1 + w (it computes x̂ · (1 + w), the project's norms x̂ · w);
- the Conv2d patch embedding becomes a Linear over (row, column, channel) patch vectors;
- flat adaLN tables (6D,) / (2D,) become (6, D) / (2, D);
- the AdaLN-Zero output layer, (scale, shift) over an affine norm, becomes (shift, scale) over a plain
  norm with the norm's weight g folded into the scale rows: g(1 + s) = 1 + (g·s + g − 1);
- the APE table (a buffer) is recomputed from the config and must equal the stored one.
An unknown config field, an unsupported setting, a shape mismatch or a tensor left over on either side
is a `UserError` naming it, raised before anything is written.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from fusedit.errors import UserError
from fusedit.model.config import DiTArch, ModelConfig, TextModulation, resolve
from fusedit.model.positions import ape
from fusedit.model.transformer import FuseDiTTransformer

# DiTConfig's own fields, and what PretrainedConfig adds when it saves one
_FIELDS = {
    "attention", "base_config", "dit_hidden_size", "dit_num_hidden_layers", "text_hidden_states_index",
    "in_channels", "initial_layers", "out_channels", "patch_size", "pos_embed", "pos_embed_max_size",
    "qk_norm", "sample_size", "sandwich_norm", "shared_attention_layers", "text_hidden_size",
    "text_modulation_embeds_dim", "timestep_conditioning",
}
_SAVED_BY_TRANSFORMERS = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
                          "_name_or_path", "_commit_hash"}
_FUSION = {"FuseDiT": "deep", "DiT": "shallow"}


def _or(value, default):
    """The config value, or the default where it is missing or null (0 and False are values)."""
    return default if value is None else value


def _gemma_norm(w: torch.Tensor) -> torch.Tensor:
    return 1 + w


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of a transformers-style folder (safetensors, single or sharded)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{folder}: no config.json (not a reference transformer directory)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_path}: not valid JSON ({exc})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json (safetensors only)")
    tensors: dict[str, torch.Tensor] = {}
    for name in shards:
        if not (folder / name).is_file():
            raise UserError(f"{folder}: shard {name} listed in the index is missing")
        tensors.update(load_file(str(folder / name)))
    return config, tensors


def model_config(cfg: dict, where: str) -> tuple[ModelConfig, object]:
    """The project's ModelConfig and the LLM's transformers config for a reference config.json."""
    from transformers import AutoConfig

    unknown = sorted(set(cfg) - _FIELDS - _SAVED_BY_TRANSFORMERS)
    if unknown:
        raise UserError(f"{where}: unknown reference config field '{unknown[0]}'")
    fusion = _FUSION.get(cfg.get("model_type"))
    if fusion is None:
        raise UserError(f"{where}: model_type '{cfg.get('model_type')}' is neither FuseDiT nor DiT")
    base = dict(cfg.get("base_config") or {})
    if base.get("model_type") not in ("gemma", "gemma2"):
        raise UserError(f"{where}: base_config.model_type '{base.get('model_type')}' is not gemma or gemma2")
    llm = AutoConfig.for_model(base.pop("model_type"), **base)
    n_shared = llm.num_hidden_layers - cfg.get("initial_layers", 0)
    shared = cfg.get("shared_attention_layers", "all")
    if shared != "all" and list(shared) != list(range(cfg.get("initial_layers", 0), llm.num_hidden_layers)):
        raise UserError(f"{where}: shared_attention_layers {shared} (only every layer after initial_layers "
                        "is supported)")
    depth = cfg.get("dit_num_hidden_layers", 18)
    if fusion == "deep" and depth != n_shared:
        raise UserError(f"{where}: dit_num_hidden_layers {depth} differs from the {n_shared} shared LLM "
                        "layers (DiT-only layers are not supported)")
    if cfg.get("out_channels", 16) != cfg.get("in_channels", 16):
        raise UserError(f"{where}: out_channels {cfg.get('out_channels')} differs from in_channels")
    if fusion == "shallow" and cfg.get("text_hidden_size") not in (None, llm.hidden_size):
        raise UserError(f"{where}: text_hidden_size {cfg['text_hidden_size']} differs from the LLM width")
    pooled = cfg.get("text_modulation_embeds_dim")
    model = ModelConfig(
        fusion=fusion, attention=cfg.get("attention", "self"),
        timestep_conditioning=cfg.get("timestep_conditioning") or "none", pos_embed=cfg.get("pos_embed", "1d-rope"),
        llm="reference", dit_hidden_size=cfg.get("dit_hidden_size"), dit_num_layers=depth,
        initial_layers=cfg.get("initial_layers", 0), text_layer_index=_or(cfg.get("text_hidden_states_index"), -1),
        qk_norm=cfg.get("qk_norm", False), sandwich_norm=cfg.get("sandwich_norm", False),
        patch_size=cfg.get("patch_size", 2), in_channels=cfg.get("in_channels", 16),
        pos_embed_max_size=cfg.get("pos_embed_max_size") or 64,
        pos_embed_base_size=cfg.get("sample_size", 32) // cfg.get("patch_size", 2),
        text_modulation=TextModulation(encoder="clip", dim=pooled) if pooled else None,
    )
    return model, llm


class _Mapping:
    """Fills the project's state dict from the reference's, tracking what each side has left."""

    def __init__(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str):
        self.source, self.target, self.where = source, target, where
        self.used: set[str] = set()
        self.out: dict[str, torch.Tensor] = {}

    def get(self, key: str) -> torch.Tensor:
        if key not in self.source:
            raise UserError(f"{self.where}: reference tensor '{key}' is missing")
        self.used.add(key)
        return self.source[key]

    def put(self, key: str, value: torch.Tensor) -> None:
        if key not in self.target:
            raise UserError(f"{self.where}: reference tensor for '{key}' has no place in this configuration")
        if tuple(value.shape) != tuple(self.target[key].shape):
            raise UserError(f"{self.where}: '{key}' has shape {tuple(value.shape)}, the model needs "
                            f"{tuple(self.target[key].shape)}")
        self.out[key] = value.to(self.target[key].dtype).contiguous()

    def copy(self, dst: str, src: str, fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """dst.weight (and dst.bias where the model has one) from src.weight / src.bias."""
        for suffix in ("weight", "bias"):
            if f"{dst}.{suffix}" in self.target:
                self.put(f"{dst}.{suffix}", fn(self.get(f"{src}.{suffix}")))

    def finish(self) -> dict[str, torch.Tensor]:
        left = sorted(set(self.source) - self.used)
        if left:
            raise UserError(f"{self.where}: reference tensor '{left[0]}' has no place in this configuration"
                            + (f" (+{len(left) - 1} more)" if len(left) > 1 else ""))
        unfilled = sorted(set(self.target) - set(self.out))
        if unfilled:
            raise UserError(f"{self.where}: nothing in the reference checkpoint fills '{unfilled[0]}'")
        return self.out


def _map_embeddings(m: _Mapping, a: DiTArch, s: str) -> None:
    conv = m.get(f"{s}patch_embed.proj.weight")
    m.put("x_embed.weight", conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1))
    m.put("x_embed.bias", m.get(f"{s}patch_embed.proj.bias"))
    if a.pos_embed == "ape":
        size = a.pos_embed_max_size
        stored = m.get(f"{s}patch_embed.pos_embed").reshape(size * size, -1)
        ours = ape(a.hidden_size, size, size, size, a.pos_embed_base_size)
        if stored.shape != ours.shape or (stored - ours).abs().max() > 1e-5:
            raise UserError(f"{m.where}: the stored APE table differs from the sincos table of its config "
                            f"(base_size {a.pos_embed_base_size}, pos_embed_max_size {size})")
    m.copy("t_embed.mlp.0", f"{s}timestep_embedder.0")
    m.copy("t_embed.mlp.2", f"{s}timestep_embedder.2")
    m.copy("t_embed.text.0", f"{s}condition_embedder.0", _gemma_norm)
    m.copy("t_embed.text.1", f"{s}condition_embedder.1")
    m.copy("t_embed.text.3", f"{s}condition_embedder.3")
    m.copy("t_embed.t_block.1", f"{s}t_block.1")
    m.copy("context.norm", f"{s}context_embedder.0", _gemma_norm)
    m.copy("context.proj", f"{s}context_embedder.1")


def _map_output(m: _Mapping, a: DiTArch, s: str) -> None:
    d = a.hidden_size
    if a.timestep_conditioning == "adaln-zero":
        g = _gemma_norm(m.get(f"{s}norm_out.norm.weight"))
        w, b = m.get(f"{s}norm_out.linear.weight"), m.get(f"{s}norm_out.linear.bias")
        (w_scale, w_shift), (b_scale, b_shift) = w.split(d), b.split(d)
        m.put("out_norm.linear.weight", torch.cat([w_shift, g[:, None] * w_scale]))
        m.put("out_norm.linear.bias", torch.cat([b_shift, g * b_scale + g - 1]))
    else:
        m.put("out_norm.norm.weight", _gemma_norm(m.get(f"{s}norm_out.weight")))
    if a.timestep_conditioning == "adaln-single":
        m.put("out_norm.scale_shift_table", m.get(f"{s}scale_shift_table").view(2, d))
    m.copy("proj_out", f"{s}proj_out")


def _map_block(m: _Mapping, a: DiTArch, s: str, i: int) -> None:
    src, dst = f"{s}layers.{i}", f"blocks.{i}"
    if a.timestep_conditioning == "adaln-zero":
        m.copy(f"{dst}.modulation.linear", f"{src}.input_layernorm.linear")
        m.copy(f"{dst}.norm1", f"{src}.input_layernorm.norm", _gemma_norm)
    else:
        m.copy(f"{dst}.norm1", f"{src}.input_layernorm", _gemma_norm)
    if a.timestep_conditioning == "adaln-single":
        m.put(f"{dst}.modulation.scale_shift_table", m.get(f"{src}.scale_shift_table").view(6, a.hidden_size))
    for ours, theirs in (("to_q", "q_proj"), ("to_k", "k_proj"), ("to_v", "v_proj"), ("to_out", "o_proj")):
        m.copy(f"{dst}.attn.{ours}", f"{src}.self_attn.{theirs}")
    m.copy(f"{dst}.attn.q_norm", f"{src}.self_attn.q_norm", _gemma_norm)
    m.copy(f"{dst}.attn.k_norm", f"{src}.self_attn.k_norm", _gemma_norm)
    pre_mlp = "pre_feedforward_layernorm" if a.sandwich_norm else "post_attention_layernorm"
    m.copy(f"{dst}.norm2", f"{src}.{pre_mlp}", _gemma_norm)
    m.copy(f"{dst}.attn_out_norm", f"{src}.post_attention_layernorm", _gemma_norm)
    m.copy(f"{dst}.mlp_out_norm", f"{src}.post_feedforward_layernorm", _gemma_norm)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        m.copy(f"{dst}.mlp.{proj}", f"{src}.mlp.{proj}")
    m.copy(f"{dst}.cross.to_q", f"{src}.cross_attn.q_proj")
    m.copy(f"{dst}.cross.to_out", f"{src}.cross_attn.o_proj")
    m.copy(f"{dst}.cross.q_norm", f"{src}.cross_attn.q_norm", _gemma_norm)
    if a.fusion == "shallow":  # per-layer text projections; their keys share the attention's k_norm
        attn = f"{src}.{'cross_attn' if a.attention == 'cross' else 'self_attn'}"
        m.copy(f"text_in.{i}.to_k", f"{attn}.text_k_proj")
        m.copy(f"text_in.{i}.to_v", f"{attn}.text_v_proj")
        m.copy(f"text_in.{i}.k_norm", f"{attn}.k_norm", _gemma_norm)


def convert_transformer(config: dict, tensors: dict[str, torch.Tensor], where: str,
                        sample_size: int = 64) -> tuple[FuseDiTTransformer, dict[str, torch.Tensor], object]:
    """The project's transformer (weights loaded) from a reference config + state dict.

    Returns it with the bundled LLM's tensors (deep fusion; empty for shallow) and the LLM's config.
    """
    model, llm_cfg = model_config(config, where)
    arch, spec = resolve(model, llm_cfg)
    prefix = "dit." if arch.fusion == "deep" else ""
    llm_tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("llm.")} if prefix else {}
    dit_tensors = {k: v for k, v in tensors.items() if not k.startswith("llm.")} if prefix else tensors
    transformer = FuseDiTTransformer(arch.model_dump(), spec.model_dump(), sample_size=sample_size)
    m = _Mapping(dit_tensors, transformer.state_dict(), where)
    _map_embeddings(m, arch, prefix)
    for i in range(arch.num_layers):
        _map_block(m, arch, prefix, i)
    _map_output(m, arch, prefix)
    transformer.load_state_dict(m.finish(), strict=True)
    return transformer.eval(), llm_tensors, llm_cfg


def _llm_from_tensors(llm_cfg, tensors: dict[str, torch.Tensor], where: str):
    from transformers import AutoModel

    llm = AutoModel.from_config(llm_cfg)
    expected = llm.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"'llm.{extra[0]}' has no place in the LLM" if extra else f"LLM tensor 'llm.{missing[0]}' is missing"
        raise UserError(f"{where}: {what}")
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise UserError(f"{where}: 'llm.{k}' has shape {tuple(v.shape)}, the LLM needs {tuple(expected[k].shape)}")
    llm.load_state_dict(tensors, strict=True)
    return llm.eval()


def _load_llm_dir(path: Path, llm_cfg, what: str):
    """A separately saved reference LLM (GemmaModel or a causal-LM checkpoint), checked against the config."""
    from transformers import AutoModel

    if not (path / "config.json").is_file():
        raise UserError(f"{what} {path}: not a transformers checkpoint directory (no config.json)")
    llm = AutoModel.from_pretrained(str(path), use_safetensors=True)
    llm = getattr(llm, "language_model", llm)
    if llm.config.hidden_size != llm_cfg.hidden_size or llm.config.num_hidden_layers < llm_cfg.num_hidden_layers:
        raise UserError(f"{what} {path}: its shape does not match the checkpoint's base_config")
    return llm.eval()


def import_reference(src: str | Path, out: str | Path, llm: str | Path | None = None,
                     clip: str | Path | None = None) -> Path:
    """Convert a reference transformer or pipeline directory into the project's format at `out`.

    Always writes `out/transformer` and `out/text_encoder`; from a whole pipeline also the tokenizer,
    scheduler, VAE (and CLIP for text modulation) with `model_index.json`, so it loads as a
    FuseDiTPipeline. Written to `out.part` and renamed, so a failed import leaves nothing behind.
    """
    src, out = Path(src), Path(out)
    pipeline = (src / "model_index.json").is_file()
    folder = src / "transformer" if pipeline else src
    config, tensors = read_checkpoint(folder)
    transformer, llm_tensors, llm_cfg = convert_transformer(config, tensors, str(folder))
    llm_dir = Path(llm) if llm else (src / "llm" if pipeline and (src / "llm").is_dir() else None)
    if llm_tensors:
        text_encoder = _llm_from_tensors(llm_cfg, llm_tensors, str(folder))
    elif llm_dir is not None:
        text_encoder = _load_llm_dir(llm_dir, llm_cfg, "--llm")
    else:
        raise UserError(f"{folder}: a shallow-fusion checkpoint does not bundle its LLM; pass --llm PATH")
    parts = {"transformer": transformer, "text_encoder": text_encoder}
    if pipeline:
        parts.update(_pipeline_parts(src))
    if transformer.arch.pooled_dim:
        parts.update(_clip_parts(src if pipeline else None, clip))
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    if pipeline:
        from fusedit.model.pipeline import FuseDiTPipeline

        FuseDiTPipeline(**parts).save_pretrained(str(tmp))
    else:
        for name, part in parts.items():
            part.save_pretrained(str(tmp / name))  # safetensors: the default of diffusers and transformers
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _pipeline_parts(src: Path) -> dict:
    """Tokenizer, scheduler and VAE of a reference pipeline directory."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    for name in ("tokenizer", "scheduler", "vae"):
        if not (src / name).is_dir():
            raise UserError(f"{src}: reference pipeline without its {name}/ folder")
    tokenizer = AutoTokenizer.from_pretrained(str(src / "tokenizer"))
    tokenizer.padding_side = "right"
    return {"tokenizer": tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(str(src / "scheduler")),
            "vae": AutoencoderKL.from_pretrained(str(src / "vae"), use_safetensors=True)}


def _clip_parts(pipeline: Path | None, clip: str | Path | None) -> dict:
    """The pooled CLIP text encoder of text modulation: --clip (model + tokenizer files) or the pipeline's clip/."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    enc_dir = Path(clip) if clip else (pipeline / "clip" if pipeline else None)
    tok_dir = Path(clip) if clip else (pipeline / "clip_tokenizer" if pipeline else None)
    if enc_dir is None or not enc_dir.is_dir():
        raise UserError("text modulation (text_modulation_embeds_dim) needs its CLIP text encoder: "
                        "the pipeline's clip/ folder or --clip PATH")
    return {"pooled_text_encoder": CLIPTextModelWithProjection.from_pretrained(str(enc_dir), use_safetensors=True),
            "pooled_tokenizer": AutoTokenizer.from_pretrained(str(tok_dir))}
