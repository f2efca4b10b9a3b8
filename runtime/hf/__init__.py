"""HF transformers checkpoint interop for gpt-oss.

    from runtime.hf import load_hf, load_hf_into, save_hf

Submodules: `keymap` (names/layouts), `config` (config.json <-> ModelArgs), `mxfp4`
(dequantization), `reader` (lazy, sliced safetensors reads), `load`, `save`, `convert` (CLI).
The public functions are imported lazily so `runtime.hf.keymap` stays cheap to import.
"""

from __future__ import annotations

_EXPORTS = {
    "load_hf": "runtime.hf.load",
    "load_hf_into": "runtime.hf.load",
    "save_hf": "runtime.hf.save",
    "dequantize_mxfp4": "runtime.hf.mxfp4",
    "quantize_mxfp4": "runtime.hf.mxfp4",
}

__all__ = ["dequantize_mxfp4", "load_hf", "load_hf_into", "quantize_mxfp4", "save_hf"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib  # lazy exports: runtime.hf.config/.keymap load without the model

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'runtime.hf' has no attribute {name!r}")
