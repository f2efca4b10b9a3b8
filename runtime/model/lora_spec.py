"""What LoRA adapts, resolved from the `[lora]` config section without torch (config validation
runs on login nodes): targets, layers, scaling, and the adapter parameter names.

Targets name modules the way users type them, matched as dot-separated suffixes against both
naming schemes of every module of a layer:

    ours                         HF transformers GptOss            canonical target
    layers.{i}.attention.wq      model.layers.{i}.self_attn.q_proj   wq   (wk, wv, wo alike)
    layers.{i}.moe.experts.mlp1  model.layers.{i}.mlp.experts.gate_up_proj   mlp1
    layers.{i}.moe.experts.mlp2  model.layers.{i}.mlp.experts.down_proj      mlp2

so "q_proj", "wq", "self_attn.q_proj", "experts.gate_up_proj", "mlp1", "layers.3.attention.wq" all
work. `all-linear` means what it means in PEFT on GptOss: every nn.Linear but the output head,
i.e. the four attention projections (HF's router is not an nn.Linear; the experts are 3-D
parameters, targeted by name). A target that names a module LoRA cannot adapt (router, norms,
output head, ...), a target that names nothing, and a target that matches no module of the
selected `layers` are errors: an adapter that silently trains nothing is the failure mode this
guards against.

Adapter parameters (the binding layout, shared with runtime/hf):
    dense   <module>.lora_A [r, in], <module>.lora_B [out, r]
    experts layers.{i}.moe.experts.mlp1_lora_A [E, r, D], mlp1_lora_B [E, 2F, r],
            mlp2_lora_A [E, r, F], mlp2_lora_B [E, D, r]
    delta W = scaling * B @ A (per expert), scaling = alpha / r, or alpha / sqrt(r) (rsLoRA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from runtime.model.args import ModelArgs

DENSE_TARGETS = ("wq", "wk", "wv", "wo")
EXPERT_TARGETS = ("mlp1", "mlp2")
TARGETS = DENSE_TARGETS + EXPERT_TARGETS
ALL_LINEAR = "all-linear"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj",
                   "experts.down_proj")
# Frozen parameter groups a LoRA run may train in full as well (fp32 masters, optimizer state).
TRAINABLE_EXTRA = ("router", "sinks", "norms", "embeddings", "output")

# (our module suffix, HF module suffix, canonical target or None) for the modules of layer i.
_LAYER_MODULES = (
    ("attention.wq", "self_attn.q_proj", "wq"),
    ("attention.wk", "self_attn.k_proj", "wk"),
    ("attention.wv", "self_attn.v_proj", "wv"),
    ("attention.wo", "self_attn.o_proj", "wo"),
    ("moe.experts.mlp1", "mlp.experts.gate_up_proj", "mlp1"),
    ("moe.experts.mlp1_weight", "mlp.experts.gate_up_proj", "mlp1"),
    ("moe.experts.mlp2", "mlp.experts.down_proj", "mlp2"),
    ("moe.experts.mlp2_weight", "mlp.experts.down_proj", "mlp2"),
    ("moe.experts", "mlp.experts", None),
    ("moe.router.gate", "mlp.router", None),
    ("moe.router", "mlp.router", None),
    ("moe", "mlp", None),
    ("attention.sinks", "self_attn.sinks", None),
    ("attention", "self_attn", None),
    ("attention_norm", "input_layernorm", None),
    ("ffn_norm", "post_attention_layernorm", None),
)
_GLOBAL_MODULES = (("tok_embeddings", "model.embed_tokens"), ("norm", "model.norm"),
                   ("output", "lm_head"), ("layers", "model.layers"))

_EXPERT_ADAPTERS = {"mlp1": ("mlp1_lora_A", "mlp1_lora_B"), "mlp2": ("mlp2_lora_A", "mlp2_lora_B")}


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    dropout: float
    # (layer id, canonical target) of every adapted module: wq wk wv wo mlp1 mlp2
    pairs: frozenset[tuple[int, str]]
    use_rslora: bool = False
    trainable_extra: tuple[str, ...] = ()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.alpha, self.use_rslora)

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(t for _, t in self.pairs)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({i for i, _ in self.pairs}))

    def adapts(self, layer: int, target: str) -> bool:
        return (layer, target) in self.pairs


def lora_scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's: alpha / r, or alpha / sqrt(r) with rsLoRA (the one definition)."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def _matches(target: str, name: str) -> bool:
    return name == target or name.endswith("." + target)


def parse_layers(text: str, n_layers: int) -> tuple[int, ...]:
    """ "all" or comma-separated ids and inclusive ranges ("0-11,14") -> sorted layer ids."""
    text = text.strip()
    if text == "all":
        return tuple(range(n_layers))
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"must be 'all' or layer ids and ranges such as '0-11,14', "
                             f"got {text!r}") from None
        if first > last or first < 0 or last >= n_layers:
            raise ValueError(f"{part!r} is outside the model's layers 0-{n_layers - 1}")
        out.update(range(first, last + 1))
    if not out:
        raise ValueError("selects no layer")
    return tuple(sorted(out))


def resolve_targets(targets: list[str] | tuple[str, ...], layers: tuple[int, ...],
                    n_layers: int) -> frozenset[tuple[int, str]]:
    """(layer, canonical target) pairs that the user's target names select within `layers`;
    ValueError naming the first bad one. A name may select one layer
    ("layers.3.attention.wq", "model.layers.3.self_attn.q_proj")."""
    if not targets:
        raise ValueError("must name at least one target")
    out: set[tuple[int, str]] = set()
    for target in targets:
        if target == ALL_LINEAR:
            out.update((i, t) for i in layers for t in DENSE_TARGETS)
            continue
        hit_any, hit_selected, found = False, False, set()
        for i in range(n_layers):
            for ours, hf, canonical in _LAYER_MODULES:
                if not (_matches(target, f"layers.{i}.{ours}")
                        or _matches(target, f"model.layers.{i}.{hf}")):
                    continue
                hit_any = True
                if canonical is None:
                    raise ValueError(
                        f"{target!r} names a module LoRA does not adapt (adaptable: "
                        f"q_proj, k_proj, v_proj, o_proj, experts.gate_up_proj, "
                        f"experts.down_proj, all-linear; train the router, sinks, norms or "
                        f"embeddings in full with lora.trainable_extra)")
                if i in layers:
                    hit_selected = True
                    found.add((i, canonical))
        if not hit_any:
            for ours, hf in _GLOBAL_MODULES:
                if _matches(target, ours) or _matches(target, hf):
                    raise ValueError(
                        f"{target!r} names a module LoRA does not adapt (the output head, "
                        f"embeddings and final norm are trained in full with "
                        f"lora.trainable_extra)")
            raise ValueError(
                f"unknown target {target!r} (targets: q_proj, k_proj, v_proj, o_proj, "
                f"experts.gate_up_proj, experts.down_proj, all-linear, or our names wq, wk, "
                f"wv, wo, mlp1, mlp2, as module-path suffixes)")
        if not hit_selected:
            raise ValueError(f"{target!r} matches no parameter in the selected layers "
                             f"{_layers_text(layers)}")
        out.update(found)
    return frozenset(out)


def _layers_text(layers: tuple[int, ...]) -> str:
    return ",".join(map(str, layers)) if len(layers) < 8 else f"{layers[0]}..{layers[-1]}"


def resolve_spec(section, model_args: ModelArgs) -> LoRASpec:
    """The LoRASpec of a `[lora]` section (enable assumed) for a model; ValueError("key: ...")
    naming the offending key first."""
    try:
        layers = parse_layers(section.layers, model_args.n_layers)
    except ValueError as e:
        raise ValueError(f"layers: {e}") from None
    try:
        pairs = resolve_targets(list(section.targets), layers, model_args.n_layers)
    except ValueError as e:
        raise ValueError(f"targets: {e}") from None
    if section.dropout > 0 and {t for _, t in pairs} & set(EXPERT_TARGETS):
        raise ValueError(f"dropout: {section.dropout} is not supported on expert targets "
                         f"(experts.gate_up_proj / experts.down_proj; PEFT refuses it too): "
                         f"set lora.dropout = 0 or target attention only")
    return LoRASpec(rank=section.rank, alpha=float(section.alpha), dropout=float(section.dropout),
                    pairs=pairs, use_rslora=bool(section.use_rslora),
                    trainable_extra=tuple(section.trainable_extra))


def is_lora_name(name: str) -> bool:
    """Whether a parameter / state-dict name is a LoRA adapter tensor."""
    return name.endswith(("lora_A", "lora_B"))


def adapter_shapes(model_args: ModelArgs, spec: LoRASpec) -> dict[str, tuple[int, ...]]:
    """name -> full shape of every adapter tensor of the whole model (the layout above)."""
    a, r = model_args, spec.rank
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    dense = {"wq": (a.dim, q), "wk": (a.dim, kv), "wv": (a.dim, kv), "wo": (q, a.dim)}
    E, D, F = a.num_experts, a.dim, a.moe_inter_dim
    experts = {"mlp1": ((E, r, D), (E, 2 * F, r)), "mlp2": ((E, r, F), (E, D, r))}
    out: dict[str, tuple[int, ...]] = {}
    for i in spec.layers:
        for t in DENSE_TARGETS:
            if spec.adapts(i, t):
                fan_in, fan_out = dense[t]
                out[f"layers.{i}.attention.{t}.lora_A"] = (r, fan_in)
                out[f"layers.{i}.attention.{t}.lora_B"] = (fan_out, r)
        for t in EXPERT_TARGETS:
            if spec.adapts(i, t):
                (name_a, name_b), (shape_a, shape_b) = _EXPERT_ADAPTERS[t], experts[t]
                out[f"layers.{i}.moe.experts.{name_a}"] = shape_a
                out[f"layers.{i}.moe.experts.{name_b}"] = shape_b
    return out


def lora_parameter_names(model_args: ModelArgs, spec: LoRASpec) -> list[str]:
    return list(adapter_shapes(model_args, spec))


def expert_adapter_names(target: str) -> tuple[str, str]:
    """("mlp1_lora_A", "mlp1_lora_B") for "mlp1", alike for "mlp2"."""
    return _EXPERT_ADAPTERS[target]


def is_trainable_extra(name: str, extra: tuple[str, ...] | list[str]) -> bool:
    """Whether a base parameter is trained in full because of lora.trainable_extra."""
    rules = {
        "router": ".moe.router." in f".{name}",
        "sinks": name.endswith("attention.sinks"),
        "norms": name.endswith("norm.weight"),
        "embeddings": name.startswith("tok_embeddings."),
        "output": name.startswith("output."),
    }
    return any(rules[k] for k in extra)
