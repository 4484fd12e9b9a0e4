"""Core ML export: a finished job as an iOS18 ML Program for the Neural Engine, and its checks on Linux.

- `export_coreml(job_dir, out)`: the `.mlpackage` (functions `prefill` and `decode` sharing weights, the
  KV cache as states), every compressed weight a `constexpr_lut_to_dense` with the job's LUT and indices.
- `verify_coreml(package, job_dir)`: reloads a package and checks it against its job: every compressed
  weight bit for bit, and the program's logits (numpy reference evaluator) against the torch model.
- `ReferenceEvaluator`: runs a saved package's functions with numpy.

Example:
    from llmpalette.export.coreml import export_coreml, verify_coreml
    export_coreml("jobs/default", "SmolLM2-4bit.mlpackage")
    print("\\n".join(verify_coreml("SmolLM2-4bit.mlpackage", "jobs/default").lines()))
"""
from llmpalette.export.coreml.export import ExportResult, build_package, export_coreml
from llmpalette.export.coreml.program import MASK_VALUE, ProgramShape, causal_mask
from llmpalette.export.coreml.reference import ReferenceEvaluator
from llmpalette.export.coreml.verify import Verification, verify_coreml, verify_package

__all__ = [
    "MASK_VALUE", "ExportResult", "ProgramShape", "ReferenceEvaluator", "Verification", "build_package",
    "causal_mask", "export_coreml", "verify_coreml", "verify_package",
]
