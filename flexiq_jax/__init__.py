"""flexiq_jax: adaptive mixed-precision (8/4-bit, channel-wise) quantization of vision models.

Notebook API:
  quantize_model(model, variables, calib_images, levels=..., selector=...) -> (qmodel, qvars)
  quantize_model(nnx_model, calib_images, ...)   a Flax NNX module (interception_nnx); apply_fn=
                                                 for any other call signature (adapt)
  make_predict(qmodel, qvars) -> predict(images, ratio)   (one compilation for every ratio)
  load_quantized(workdir) -> LoadedRun (config, float model, quantized model, serving variables)
  report(workdir or (qmodel, qvars), report_ratio=0.5) -> LayerReport (per-layer Markdown/JSON/plot)
  export_portable(qmodel, qvars, directory, image_shape), export_run(workdir) -> PortableExport
    (a jax.export module of the integer path, ratio as an input; weights; encodings JSON)

Pipeline, one subpackage per stage (docs/DESIGN.md):
  models -> calibrate -> select -> quantize -> finetune -> evaluate / serve
with `data` feeding every stage, `train` for the float model, `cost` for MACs/BOPs, `numerics`
for the Flax-free quantization maths and `interception` between models and quantization.
"""

from flexiq_jax.version import __version__  # noqa: E402  (the one place the version is set)
from flexiq_jax.api import (LayerReport, LoadedRun, PortableExport, export_portable, export_run,  # noqa: E402
                            load_portable, load_quantized, make_predict, quantize_model, report)

__all__ = ["LayerReport", "LoadedRun", "PortableExport", "export_portable", "export_run", "load_portable",
           "load_quantized", "make_predict", "quantize_model", "report", "__version__"]
