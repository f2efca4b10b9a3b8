"""The GPT-OSS model: `from runtime.model import ModelArgs, GptOssModel, FLAVORS`."""

from runtime.model.args import FLAVORS, ModelArgs
from runtime.model.model import GptOssModel, count_parameters

__all__ = ["FLAVORS", "GptOssModel", "ModelArgs", "count_parameters"]
