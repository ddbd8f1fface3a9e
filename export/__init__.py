"""The global model -> ONNX -> quantized ONNX -> signed (and optionally encrypted) package. Never reaches Flower.

Modules: `onnx_export` (fp32 export, int8 and A16W8 QDQ quantization, package form of a model),
`calibration` (spec-derived calibration inputs), `pipeline` (the one export path from a run's
weights to those files: `export_models`), `package` (the package format, the manifest's one
validator, `verify_package`, `site_study`), `build` (`build_package` from a run record),
`site_quantization` (`fedcare quantize`), `encryption` (PKG.enc for one site), `signing` (the
package keys), `commands` (`fedcare export`, `verify`, `quantize`). `package`, `encryption` and
`signing` load no ONNX tooling, so verifying stays light.
"""
