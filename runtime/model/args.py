"""Model hyper-parameters (`ModelArgs`) and the named flavors.

Every field is validated in `__post_init__` so a bad config fails with a one-line
ValueError naming the field before any weight is allocated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ATTN_BACKENDS = ("auto", "flex", "math")
MOE_IMPLS = ("grouped", "loop")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclass
class ModelArgs:
    # Shapes.
    dim: int = 2880
    n_layers: int = 24
    n_heads: int = 64
    n_kv_heads: int = 8
    head_dim: int = 64
    vocab_size: int = 201088
    moe_inter_dim: int = 2880  # per-expert hidden size F (mlp1 is 2F wide)
    num_experts: int = 32
    top_k: int = 4

    # Attention: even layers use a sliding window of `sliding_window` keys (self included),
    # odd layers are full causal, unless `layer_types` lists them explicitly (HF configs do).
    sliding_window: int = 128
    layer_types: tuple[str, ...] | None = None
    norm_eps: float = 1e-5

    # YaRN RoPE (HF names: rope_theta, factor, beta_fast, beta_slow, original_max_position_embeddings).
    rope_theta: float = 150000.0
    rope_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_seq_len: int = 4096
    rope_truncate: bool = False
    max_seq_len: int = 131072

    # Experts: clamped SwiGLU.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    # Load balancing: aux-loss-free expert bias (None disables the bias) + optional aux loss.
    load_balance_coeff: float | None = 1e-3
    aux_loss_coeff: float = 0.0

    # Implementation switches (not part of the math).
    attn_backend: str = "auto"  # auto: flex on CUDA, math elsewhere
    moe_impl: str = "grouped"  # grouped: torch._grouped_mm; loop: per-expert reference
    compute_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 elsewhere
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = (
            "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size",
            "moe_inter_dim", "num_experts", "top_k", "sliding_window",
            "rope_original_seq_len", "max_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelArgs.n_heads ({self.n_heads}) must be divisible by "
                f"ModelArgs.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"ModelArgs.head_dim must be even for RoPE, got {self.head_dim}")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"ModelArgs.top_k ({self.top_k}) must not exceed "
                f"ModelArgs.num_experts ({self.num_experts})"
            )
        for name in ("norm_eps", "rope_theta", "rope_factor", "swiglu_alpha", "swiglu_limit",
                     "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelArgs.{name} must be > 0, got {getattr(self, name)!r}")
        if self.load_balance_coeff is not None and self.load_balance_coeff < 0:
            raise ValueError(
                f"ModelArgs.load_balance_coeff must be >= 0 or None, got {self.load_balance_coeff!r}"
            )
        if self.aux_loss_coeff < 0:
            raise ValueError(f"ModelArgs.aux_loss_coeff must be >= 0, got {self.aux_loss_coeff!r}")
        for name, allowed in (("attn_backend", ATTN_BACKENDS), ("moe_impl", MOE_IMPLS),
                              ("compute_dtype", COMPUTE_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"ModelArgs.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layers:
                raise ValueError(
                    f"ModelArgs.layer_types has {len(self.layer_types)} entries but "
                    f"ModelArgs.n_layers is {self.n_layers}"
                )
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(f"ModelArgs.layer_types entries must be in {LAYER_TYPES}, got {bad[0]!r}")

    # ------------------------------------------------------------------ derived
    def is_sliding(self, layer_id: int) -> bool:
        """Even layers slide (HF: layer_types[i] == 'sliding_attention' for i % 2 == 0)."""
        if self.layer_types is not None:
            return self.layer_types[layer_id] == "sliding_attention"
        return layer_id % 2 == 0

    def replace(self, **changes) -> "ModelArgs":
        """A validated copy with some fields changed (e.g. a reduced layer count)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FLAVORS: dict[str, ModelArgs] = {
    # Small enough to train on a 2-core CPU in minutes; the vocabulary matches the
    # embedded tokenizer (runtime/assets/tokenizer.json).
    "debugmodel": ModelArgs(
        dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, vocab_size=8192,
        moe_inter_dim=256, num_experts=8, top_k=4, max_seq_len=4096,
    ),
    # For unit and launch tests: every mechanism present, tiny layers (vocab = embedded tokenizer).
    "tiny": ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=8192,
        moe_inter_dim=64, num_experts=4, top_k=2, sliding_window=8, max_seq_len=1024,
    ),
    "20b": ModelArgs(
        dim=2880, n_layers=24, n_heads=64, n_kv_heads=8, head_dim=64, vocab_size=201088,
        moe_inter_dim=2880, num_experts=32, top_k=4,
    ),
    "120b": ModelArgs(
        dim=2880, n_layers=36, n_heads=64, n_kv_heads=8, head_dim=64, vocab_size=201088,
        moe_inter_dim=2880, num_experts=128, top_k=4,
    ),
}
