"""FuseDiT: a frozen LLM deeply fused with a trainable diffusion transformer.

Heavy classes are exported lazily so that diffusers can load an exported pipeline by
`fusedit.<ClassName>` (as written in model_index.json) without the CLI paying for torch.
"""
from importlib import import_module

_LAZY = {
    "FuseDiTTransformer": "fusedit.model.transformer",
    "FuseDiTPipeline": "fusedit.model.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusedit' has no attribute {name!r}")
