"""The FuseDiT model library: recipes, text stream, DiT block, flow objective, pipeline, reference import.

`from fusedit.model import load_denoiser` is resolved lazily, so importing a light module of the library
(its config, say) does not import diffusers and transformers.
"""

__all__ = ["load_denoiser"]


def __getattr__(name: str):
    if name == "load_denoiser":
        from fusedit.model.pipeline import load_denoiser

        return load_denoiser
    raise AttributeError(f"module 'fusedit.model' has no attribute '{name}'")
