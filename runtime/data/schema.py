"""The [data] keys: `DataConfig`. Any object with these attribute names (or a dict) is
accepted by the data package; a missing name takes the default here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    dataset: str = ""  # embedded | path | hf | chat | prepared; "" = hf if hf_dataset, path if dataset_path
    dataset_path: str | list[str] = ""  # file, directory or glob (or a list of them)
    text_key: str = "text"  # JSON key / parquet column / HF field holding the text
    hf_dataset: str = ""  # HF datasets name or local path; needs `datasets`
    hf_config: str = ""  # HF dataset config name ("" = default)
    hf_split: str = "train"
    hf_streaming: bool = True  # False: download/prepare the split, then read it by index
    document_mask: bool = True  # per-document positions and ids (else one long context)
    shuffle: bool = False  # a new seeded order each epoch
    shuffle_seed: int = 0
    shuffle_buffer: int = 10000  # HF streaming shuffle buffer (documents)
    tokenize_batch_docs: int = 64  # documents per encode_batch call
    prefetch: int = 2  # batches produced ahead on a background thread; 0 = on the caller's
    cache_dir: str = ""  # where the embedded corpus is prepared; "" = $XDG_CACHE_HOME/...
    # chat data (dataset = "chat"; runtime.data.chat_source)
    loss_on: str = "last_assistant"  # | "all_assistant" | "all"
    chat_overflow: str = "truncate"  # | "drop": conversations longer than seq_len
    chat_template: str = ""  # a .jinja file; "" = the tokenizer dir's template, else built-in
    chat_date: str = ""  # YYYY-MM-DD shown as the system message's date; "" = today


def data_option(cfg, name: str):
    """`cfg.name` for a DataConfig-like object, dict or None (the default when absent)."""
    default = getattr(DataConfig, name)
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


@dataclass
class ValidationConfig:
    """The [validation] keys (torchtitan's enable/freq/steps, plus where the held-out data is)."""

    enable: bool = False
    freq: int = 100  # evaluate every `freq` steps (and after the last one)
    steps: int = 10  # batches of the global batch size per evaluation (-1: the whole source once)
    split_fraction: float = 0.0  # > 0: this fraction of the training source (content hash)
    dataset: str = ""  # a held-out source ("" keeps the training kind) ...
    dataset_path: str | list[str] = ""
    hf_dataset: str = ""
    hf_config: str = ""
    hf_split: str = "validation"


def validation_option(cfg, name: str):
    """`cfg.name` for a ValidationConfig-like object, dict or None."""
    default = getattr(ValidationConfig, name)
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)
