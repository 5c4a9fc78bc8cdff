"""Typed recipes: one small YAML per paper configuration, validated at load time."""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusedit.errors import UserError, read_yaml

Fusion = Literal["deep", "shallow"]
AttentionKind = Literal["self", "cross"]
TimestepConditioning = Literal["adaln-zero", "adaln-single", "addition", "none"]
PosEmbed = Literal["ape", "1d-rope", "2d-rope", "m-rope"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextModulation(Strict):
    """Pooled text embedding (CLIP-like) added to the timestep embedding."""

    encoder: str
    subfolder: str | None = None
    tokenizer_subfolder: str | None = None
    dim: int = Field(768, gt=0)


class ModelConfig(Strict):
    """Everything that decides the denoiser's architecture and its text features."""

    fusion: Fusion = "deep"
    attention: AttentionKind = "self"
    timestep_conditioning: TimestepConditioning = "adaln-zero"
    pos_embed: PosEmbed = "ape"
    llm: str = "google/gemma-2b"
    tokenizer: str | None = None  # defaults to `llm`
    text_modulation: TextModulation | None = None
    dit_hidden_size: int | None = Field(None, gt=0)  # defaults to the LLM width
    dit_num_layers: int | None = Field(None, gt=0)  # defaults to the LLM depth minus initial_layers
    initial_layers: int = Field(0, ge=0)  # LLM layers that run text-only before the first shared one
    text_layer_index: int = -1  # shallow fusion: which `hidden_states` entry feeds the DiT
    max_prompt_length: int = Field(256, gt=0)
    instruction: str = ""
    qk_norm: bool = True
    sandwich_norm: bool = False
    patch_size: int = Field(2, gt=0)
    in_channels: int = Field(16, gt=0)
    resolution: int = Field(512, gt=0)  # pixels
    vae: str | None = "stabilityai/stable-diffusion-3-medium-diffusers"  # None = pixel space
    vae_subfolder: str | None = "vae"
    vae_scale: int = Field(8, gt=0)  # pixels per latent cell
    pos_embed_max_size: int = Field(64, gt=0)
    # APE positions are scaled by base / max size. The reference derives base from sample_size // patch_size
    # and never sets sample_size, so every paper configuration has 32 // 2 = 16, at every resolution.
    pos_embed_base_size: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.resolution % (self.vae_scale * self.patch_size):
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of vae_scale*patch_size "
                f"({self.vae_scale}*{self.patch_size})"
            )
        if self.vae is None and (self.vae_scale != 1 or self.in_channels != 3):
            raise ValueError("vae: pixel space (vae: null) needs vae_scale: 1 and in_channels: 3")
        if self.text_modulation and self.timestep_conditioning == "none":
            raise ValueError("text_modulation is added to the timestep embedding; "
                             "timestep_conditioning 'none' has none")
        if self.fusion == "shallow" and self.initial_layers:
            raise ValueError("initial_layers: only deep fusion shares LLM layers")
        return self

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale


class FlowConfig(Strict):
    """Rectified flow with logit-normal timesteps on the SD3 shifted schedule."""

    shift: float = Field(3.0, gt=0)
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    num_train_timesteps: int = Field(1000, gt=0)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    sample_steps: int = Field(25, gt=0)
    guidance: float = Field(6.0, ge=0)


class Recipe(Strict):
    name: str
    model: ModelConfig = ModelConfig()
    flow: FlowConfig = FlowConfig()


RECIPES_DIR = Path(str(resources.files("fusedit.model") / "recipes"))


def recipe_names() -> list[str]:
    return sorted(str(p.relative_to(RECIPES_DIR).with_suffix("")) for p in RECIPES_DIR.rglob("*.yaml"))


def _read_yaml(name_or_path: str) -> tuple[str, dict]:
    if not isinstance(name_or_path, str) or not name_or_path:
        raise UserError(f"recipe name must be a non-empty string (got {name_or_path!r})")
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown recipe '{name_or_path}' (known: {', '.join(recipe_names())})")
    elif not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    data = read_yaml(path, "recipe") or {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path}: expected a mapping at the top level")
    return str(path), data


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    path, data = _read_yaml(name_or_path)
    if path in seen:
        raise UserError(f"recipe {path}: 'base' forms a cycle")
    base = data.pop("base", None)
    if not base:
        return data
    try:
        inherited = _resolve(base, (*seen, path))
    except UserError as exc:  # name the file and field at fault, not only the (possibly non-string) value
        raise UserError(f"recipe {path}: base: {exc}") from None
    return _merge(inherited, data)


def parse_overrides(overrides: list[str] | dict[str, Any] | None) -> dict:
    """`a.b=value` strings (value parsed as YAML) or a flat {dotted: value} dict -> nested dict."""
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = []
        for o in overrides or []:
            if "=" not in o:
                raise UserError(f"override '{o}' must look like field.path=value")
            key, value = o.split("=", 1)
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or exc
                raise UserError(f"override '{o}': the value is not valid YAML ({problem})") from None
            items.append((key, parsed))
    nested: dict = {}
    for key, value in items:
        *parents, leaf = key.split(".")
        if not all((*parents, leaf)):
            raise UserError(f"override '{key}': empty field name in the dotted path")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{key}': '{p}' was already set to a value, not a section")
        if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
            raise UserError(f"override '{key}' replaces a section that other overrides set fields of")
        node[leaf] = value
    return nested


def load_recipe(name_or_path: str, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load a recipe by name (`fusedit/baseline`) or YAML path, apply dotted overrides, validate."""
    data = _merge(_resolve(name_or_path), parse_overrides(overrides))
    data.setdefault("name", name_or_path)
    return Recipe.model_validate(data)


class TextSpec(Strict):
    """What the frozen LLM must produce for the DiT: it decides the text features (and their cache)."""

    kind: Literal["kv", "hidden"]
    layers: list[int] = []  # deep fusion: LLM layers whose K/V the DiT reads, in DiT order
    rope_keys: bool = True  # deep self-attention reads post-RoPE keys; cross-attention pre-RoPE ones
    hidden_index: int = -1  # shallow fusion: `hidden_states` index
    llm_num_layers: int  # the LLM is truncated to this many layers
    max_length: int
    instruction: str = ""


class DiTArch(Strict):
    """The resolved shapes and variant names the denoiser is built from (saved in its config.json)."""

    fusion: Fusion
    attention: AttentionKind
    timestep_conditioning: TimestepConditioning
    pos_embed: PosEmbed
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    in_channels: int
    patch_size: int
    pos_embed_max_size: int
    pos_embed_base_size: int = 16
    text_dim: int  # LLM width (shallow fusion projects it)
    pooled_dim: int | None
    qk_norm: bool
    sandwich_norm: bool
    rope_theta: float


def resolve(model: ModelConfig, llm) -> tuple[DiTArch, TextSpec]:
    """Combine a model config with its LLM's config (a transformers config) into the DiT's shapes."""
    n_llm = llm.num_hidden_layers
    if model.initial_layers >= n_llm:
        raise UserError(f"model.initial_layers={model.initial_layers} leaves none of the LLM's {n_llm} layers")
    available = n_llm - model.initial_layers
    depth = model.dit_num_layers or (available if model.fusion == "deep" else n_llm)
    if model.fusion == "deep" and depth > available:
        raise UserError(f"model.dit_num_layers={depth} exceeds the {available} LLM layers after "
                        f"initial_layers={model.initial_layers}: deep fusion pairs every DiT layer with one")
    head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // llm.num_attention_heads
    if model.pos_embed in ("2d-rope", "m-rope") and head_dim % 4:
        raise UserError(f"model.pos_embed={model.pos_embed} needs head_dim divisible by 4 (got {head_dim})")
    if model.fusion == "shallow" and not -n_llm - 1 <= model.text_layer_index <= n_llm:
        raise UserError(f"model.text_layer_index={model.text_layer_index} is outside the LLM's "
                        f"{n_llm + 1} hidden states")
    if model.fusion == "deep":
        text = TextSpec(kind="kv", layers=list(range(model.initial_layers, model.initial_layers + depth)),
                        rope_keys=model.attention == "self", llm_num_layers=model.initial_layers + depth,
                        max_length=model.max_prompt_length, instruction=model.instruction)
    else:
        idx = model.text_layer_index  # the whole LLM runs: hidden_states[-1] is after its final norm
        text = TextSpec(kind="hidden", hidden_index=idx, llm_num_layers=n_llm,
                        max_length=model.max_prompt_length, instruction=model.instruction)
    rope = getattr(llm, "rope_parameters", None) or {}
    arch = DiTArch(
        fusion=model.fusion, attention=model.attention, timestep_conditioning=model.timestep_conditioning,
        pos_embed=model.pos_embed, hidden_size=model.dit_hidden_size or llm.hidden_size, num_layers=depth,
        num_heads=llm.num_attention_heads, num_kv_heads=llm.num_key_value_heads, head_dim=head_dim,
        mlp_dim=llm.intermediate_size, in_channels=model.in_channels, patch_size=model.patch_size,
        pos_embed_max_size=model.pos_embed_max_size, pos_embed_base_size=model.pos_embed_base_size,
        text_dim=llm.hidden_size,
        pooled_dim=model.text_modulation.dim if model.text_modulation else None,
        qk_norm=model.qk_norm, sandwich_norm=model.sandwich_norm,
        rope_theta=rope.get("rope_theta", getattr(llm, "rope_theta", 10000.0)),
    )
    return arch, text
