"""The [data] keys, one schema: `DataConfig` IS the job config's [data] section.

The trainer's config (runtime/train/config_schema.py) lists `DataConfig` as its `data` section:
each field's `choices` / `check` / `help` metadata is what the config loader validates and
prints in --help, and `problems()` holds the rules that involve several [data] keys. The data
package reads the same names from a DataConfig, a dict or any object (`data_option`), so
library callers and tests need no config. Pure Python: importing it never imports torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

DATASETS = ("embedded", "path", "hf", "chat", "prepared")
LOSS_ON = ("last_assistant", "last_user_turn", "all_assistant", "all")
CHAT_OVERFLOW = ("cut_turns", "truncate", "drop")
PACKING = ("sequential", "best_fit")


def _key(default, *, choices=None, check: Callable | None = None, help: str = ""):
    """A [data] key: the config schema's field convention (allowed values or a check that
    returns None when fine, else a phrase such as "must be > 0")."""
    return field(default=default, metadata={"choices": choices, "check": check, "help": help})


def _non_empty(v):
    return None if v else "must not be empty"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _positive(v):
    return None if v > 0 else "must be > 0"


def _fraction(v):
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _date_or_empty(v):
    return None if not v or re.fullmatch(r"\d{4}-\d{2}-\d{2}", v) else "must be YYYY-MM-DD or ''"


@dataclass
class DataConfig:
    dataset: str = _key("embedded", choices=DATASETS,
                        help="embedded sample text | local files | HF datasets | chat JSONL "
                             "(dataset_path / hf_dataset; neither: the embedded chat sample) | "
                             "prepared (dataset_path: a folder of `python -m runtime.data "
                             "prepare`)")
    dataset_path: str = _key("", help="file, directory or glob of .jsonl/.json/.parquet/.txt "
                                      "(a prepared folder for dataset = 'prepared')")
    text_key: str = _key("text", check=_non_empty, help="field holding the text in records")
    hf_dataset: str = _key("", help="HF datasets name, local path or save_to_disk folder "
                                       "(data.dataset = 'hf' or 'chat')")
    hf_config: str = _key("", help="HF dataset config name ('' = its default)")
    hf_split: str = _key("train", check=_non_empty, help="HF split")
    hf_streaming: bool = _key(True, help="stream instead of downloading the whole dataset")
    document_mask: bool = _key(True, help="packed documents do not attend to each other")
    shuffle: bool = _key(False, help="a new document order each epoch, seeded by shuffle_seed: "
                                     "shards (files) permuted, then the records inside each")
    shuffle_seed: int = _key(0, check=_non_negative,
                             help="seed of data.shuffle (same seed: same order, exact resume)")
    shuffle_buffer: int = _key(10000, check=_positive,
                               help="HF streaming: documents in the shuffle buffer")
    tokenize_batch_docs: int = _key(64, check=_positive,
                                    help="streamed sources: documents per tokenizer call")
    prefetch: int = _key(2, check=_non_negative,
                         help="batches prepared ahead on a background thread; 0 = on the "
                              "training thread")
    cache_dir: str = _key("", help="where the embedded corpus is prepared on first use; '' = "
                                   "$XDG_CACHE_HOME/gptoss-runtime/data (~/.cache/...)")
    # chat data (dataset = "chat"; runtime.data.chat_source)
    loss_on: str = _key("last_assistant", choices=LOSS_ON,
                        help="chat: which tokens are trained (the rest are IGNORE_INDEX)")
    chat_overflow: str = _key("cut_turns", choices=CHAT_OVERFLOW,
                              help="chat: a conversation longer than training.seq_len: earlier "
                                   "turns cut from the left (system/developer kept) | its "
                                   "first seq_len tokens | dropped; one that would train no "
                                   "token is always dropped")
    max_dropped_fraction: float = _key(0.5, check=_fraction,
                                       help="chat: stop (exit 2) when more than this share of "
                                            "the conversations seen is dropped (checked from "
                                            "100 seen or one epoch); 1 = never")
    pack: str = _key("sequential", choices=PACKING,
                     help="chat: windows filled in order, or best fit (the longest that fits "
                          "among the next pack_buffer conversations)")
    pack_buffer: int = _key(64, check=_positive,
                            help="chat, pack = 'best_fit': conversations looked ahead")
    chat_template: str = _key("", help="chat: a .jinja template file; '' = the tokenizer dir's "
                                       "chat template, else the built-in harmony renderer")
    chat_date: str = _key("", check=_date_or_empty,
                          help="chat: YYYY-MM-DD shown as the system message's date; '' = today")

    def problems(self, name: Callable[[str], str] = lambda k: f"data.{k}") -> Iterator[tuple[str, str]]:
        """(key, problem) for each rule involving several [data] keys; `name(key)` spells
        another key in the message (the config passes `--data.key` for command-line values)."""
        if self.dataset in ("path", "prepared") and not self.dataset_path:
            yield "dataset", f"is '{self.dataset}' but {name('dataset_path')} is empty"
        if self.dataset == "hf" and not self.hf_dataset:
            yield "dataset", f"is 'hf' but {name('hf_dataset')} is empty"
        if self.dataset == "chat" and self.dataset_path and self.hf_dataset:
            yield "dataset_path", (f"and {name('hf_dataset')} are both set for chat data: "
                                   "choose one")
        unused = {"embedded": ("dataset_path", "hf_dataset"), "path": ("hf_dataset",),
                  "hf": ("dataset_path",), "prepared": ("hf_dataset",)}.get(self.dataset, ())
        for key in unused:
            if getattr(self, key):
                yield key, (f"is set but {name('dataset')} = {self.dataset!r} never reads it "
                            "(set data.dataset to the source you mean)")
        if self.shuffle_seed and not self.shuffle:
            yield "shuffle_seed", f"has no effect unless {name('shuffle')} = true"


def data_option(cfg, name: str):
    """`cfg.name` for a DataConfig-like object, dict or None (the default when absent)."""
    default = DataConfig.__dataclass_fields__[name].default
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
