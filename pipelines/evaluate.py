"""KFP v2 pipeline of the evaluation step: an exported pipeline -> metrics and report, on one GPU.

Wiring only: the component is the evaluation step's own (components/evaluate/component.py). The task is placed
like the workflow's evaluation task (pipelines/placement.py `place`): on the GPU pool its `node_selector` /
`tolerations` run parameters name (the same defaults as the workflow's), with a RAM-backed /dev/shm.
"""
from kfp import compiler, dsl
from kfp.dsl import Model

from fusedit.components.evaluate.component import evaluate_op
from fusedit.pipelines.placement import GPU_NODE_SELECTOR, GPU_TOLERATIONS, place


@dsl.pipeline(name="fusedit-evaluate", description="Exported pipeline (s3://bucket/train/joint/pipeline) -> metrics")
def evaluate_pipeline(pipeline_uri: str, config_yaml: str = "", output_uri: str = "",
                      node_selector: dict = GPU_NODE_SELECTOR, tolerations: list = GPU_TOLERATIONS):  # noqa: B006
    source = dsl.importer(artifact_uri=pipeline_uri, artifact_class=Model, reimport=False)
    place(evaluate_op(pipeline=source.output, config_yaml=config_yaml, output_uri=output_uri), 1, node_selector,
          tolerations)


def compile_pipeline(out_dir: str) -> str:
    import os

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "evaluate_pipeline.yaml")
    compiler.Compiler().compile(evaluate_pipeline, path)
    return path
