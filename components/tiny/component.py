"""KFP v2 component definition of the tiny step: a task whose body calls `write_tiny`.

The body is the function behind `fusedit model init-tiny` (fusedit.model.tiny), which the DVC `tiny` stage
runs; for the tiny recipe it writes the tiny LLM and points `model.llm` at it, other recipes pass through.
"""
from kfp import dsl
from kfp.dsl import Model, Output

from fusedit.components.shared.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tiny_op(tiny: Output[Model], recipe: str, overrides: list = []) -> list:  # noqa: B006
    """The DVC `tiny` stage: for the tiny recipe, write the tiny LLM and point `model.llm` at it.

    Returns the recipe overrides every model-loading task uses; other recipes (or an explicit model.llm)
    pass through unchanged.
    """
    from pathlib import Path

    out = list(overrides)
    if recipe == "tiny" and not any(o.startswith("model.llm=") for o in out):
        from fusedit.model.tiny import write_tiny

        write_tiny(Path(tiny.path), seed=0)
        out.append(f"model.llm={Path(tiny.path) / 'llm'}")
    else:
        Path(tiny.path).mkdir(parents=True, exist_ok=True)
    tiny.metadata.update({"recipe": recipe})
    return out
