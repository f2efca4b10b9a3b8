"""The [data] and [validation] keys, one schema each: `DataConfig` IS the job config's [data]
section and `ValidationConfig` its [validation] section.

The trainer's config (runtime/train/config/schema.py) lists them as its sections:
each field's `choices` / `check` / `help` metadata is what the config loader validates and
prints in --help, and `problems()` holds the rules that involve several [data] keys. The data
package takes these typed objects (None: the defaults) and reads their attributes. Pure
Python: importing it never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from runtime.config_fields import (
    auto_or_positive,
    date_or_empty,
    non_empty,
    non_negative,
    option,
    positive,
    unit_interval,
)

DATASETS = ("embedded", "path", "hf", "chat", "prepared")
LOSS_ON = ("last_assistant", "last_user_turn", "all_assistant", "all")
CHAT_OVERFLOW = ("cut_turns", "truncate", "drop")
PACKING = ("sequential", "best_fit")


@dataclass
class DataConfig:
    dataset: str = option("embedded", choices=DATASETS,
                        help="embedded sample text | local files | HF datasets | chat JSONL "
                             "(dataset_path / hf_dataset; neither: the embedded chat sample) | "
                             "prepared (dataset_path: a folder of `python -m runtime.data "
                             "prepare`)")
    dataset_path: str = option("", help="file, directory or glob of .jsonl/.json/.parquet/.txt "
                                      "(a prepared folder for dataset = 'prepared')")
    text_key: str = option("text", check=non_empty, help="field holding the text in records")
    hf_dataset: str = option("", help="HF datasets name, local path or save_to_disk folder "
                                       "(data.dataset = 'hf' or 'chat')")
    hf_config: str = option("", help="HF dataset config name ('' = its default)")
    hf_split: str = option("train", check=non_empty, help="HF split")
    hf_streaming: bool = option(True, help="stream instead of downloading the whole dataset")
    document_mask: bool = option(True, help="packed documents do not attend to each other")
    shuffle: bool = option(False, help="a new document order each epoch, seeded by shuffle_seed: "
                                     "shards (files) permuted, then the records inside each")
    shuffle_seed: int = option(0, check=non_negative,
                             help="seed of data.shuffle (same seed: same order, exact resume)")
    shuffle_buffer: int = option(10000, check=positive,
                               help="HF streaming: documents in the shuffle buffer")
    tokenize_batch_docs: int = option(64, check=positive,
                                    help="streamed sources: documents per tokenizer call")
    prefetch: int = option(2, check=non_negative,
                         help="batches prepared ahead on a background thread; 0 = on the "
                              "training thread")
    cache_dir: str = option("", help="where the embedded corpus is prepared on first use; '' = "
                                   "$XDG_CACHE_HOME/gptoss-runtime/data (~/.cache/...)")
    # chat data (dataset = "chat"; runtime.data.chat.source)
    loss_on: str = option("last_assistant", choices=LOSS_ON,
                        help="chat: which tokens are trained (the rest are IGNORE_INDEX)")
    chat_overflow: str = option("cut_turns", choices=CHAT_OVERFLOW,
                              help="chat: a conversation longer than training.seq_len: earlier "
                                   "turns cut from the left (system/developer kept) | its "
                                   "first seq_len tokens | dropped; one that would train no "
                                   "token is always dropped")
    max_dropped_fraction: float = option(0.5, check=unit_interval,
                                       help="chat: stop (exit 2) when more than this share of "
                                            "the conversations seen is dropped (checked from "
                                            "100 seen or one epoch); 1 = never")
    pack: str = option("sequential", choices=PACKING,
                     help="chat: windows filled in order, or best fit (the longest that fits "
                          "among the next pack_buffer conversations)")
    pack_buffer: int = option(64, check=positive,
                            help="chat, pack = 'best_fit': conversations looked ahead")
    chat_template: str = option("", help="chat: a .jinja template file; '' = the tokenizer dir's "
                                       "chat template, else the built-in harmony renderer")
    chat_date: str = option("", check=date_or_empty,
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


VALIDATION_DATASETS = ("", "embedded", "path", "hf", "chat")


@dataclass
class ValidationConfig:
    """The [validation] keys (torchtitan's enable/freq/steps, plus where the held-out data is);
    the job config's [validation] section is this class."""

    enable: bool = option(False, help="log validation_loss on held-out data")
    freq: int = option(100, check=positive, help="steps between evaluations (and after the last)")
    steps: int = option(10, check=auto_or_positive,
                        help="global batches per evaluation; -1: the whole held-out set once")
    split_fraction: float = option(0.0, check=unit_interval,
                                   help=">0: hold out this fraction of the training data "
                                        "(by content hash) instead of a separate source")
    dataset: str = option("", choices=VALIDATION_DATASETS, help="'' = the training data's kind")
    dataset_path: str = option("", help="held-out files (as data.dataset_path)")
    hf_dataset: str = option("", help="held-out HF dataset (default: the training one)")
    hf_config: str = option("", help="HF config of the held-out dataset ('' = its default)")
    hf_split: str = option("validation", check=non_empty, help="HF split of the held-out data")
