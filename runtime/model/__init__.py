"""The GPT-OSS model: `from runtime.model import ModelArgs, GptOssModel, FLAVORS`.

`ModelArgs`/`FLAVORS` import without torch (config validation on login nodes stays light);
the modules are loaded on first use.
"""

from runtime.model.args import FLAVORS, ModelArgs

__all__ = ["FLAVORS", "GptOssModel", "ModelArgs", "count_parameters"]


def __getattr__(name: str):
    if name in ("GptOssModel", "count_parameters"):
        from runtime.model import model  # lazy: ModelArgs/FLAVORS must import without torch

        return getattr(model, name)
    raise AttributeError(f"module 'runtime.model' has no attribute {name!r}")
