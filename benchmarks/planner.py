"""Per-GPU memory and communication plan for this pipeline: ZeRO-3, frozen NF4 base, LoRA, pruning scores.

``tools/plan.py`` is the CLI. Everything is computed per parameter tensor of the model, the way
DeepSpeed ZeRO-3 and bitsandbytes hold it, from ``config.json`` dimensions alone.

Notation: ``W`` world size (nodes x GPUs), ``B`` bytes of the model dtype (bf16: 2), ``L`` layers,
``h`` hidden, ``H``/``K`` query/KV heads of size ``d``, ``I`` MLP width, ``V`` vocabulary, ``b``
micro-batch, ``S`` sequence length, ``r`` LoRA rank. Projections (out x in): q ``Hd x h``, k and v
``Kd x h``, o ``h x Hd``, gate and up ``I x h``, down ``h x I``.

Memory, per rank
----------------
*ZeRO-3 shard* of a tensor of ``n`` elements: ``ceil(n / W)`` elements (its partition), plus the
whole tensor when ``n <= stage3_param_persistence_threshold`` and ``W > 1`` (persistent parameters
stay gathered once fetched).

Resident (from ``deepspeed.initialize`` to the end):

* 4-bit base: every projection is stored packed, 0.5 byte per weight, as ``ceil(out*in / 2 / B)``
  elements of the model dtype (``bnb_4bit_quant_storage``), and sharded as above.
* NF4 quant state, not a parameter, so **replicated** on every rank: per projection
  ``ceil(n/64)`` absmax bytes (uint8 with double quantisation; fp32 = 4 bytes without), plus
  ``4 ceil(n/64/256)`` second-level absmax, the 16-entry NF4 and 256-entry nested code books (fp32)
  and a 4-byte offset. About 0.016 byte per weight: ~1.1 GB for a 70B model, whatever ``W``.
* Unquantized parameters (embeddings, lm_head unless tied, RMSNorm weights, q/k/v biases of Qwen2)
  in the model dtype, sharded.
* LoRA ``A`` (``r x in``) and ``B`` (``out x r``) of every targeted projection in the model dtype
  (DeepSpeed casts the module), sharded; ``P = sum ceil(n / W)`` over them is the LoRA partition.
* LoRA gradient partition (``contiguous_gradients`` flat buffer): ``P x B``.
* Optimizer (DeepSpeed's stage-3 wrapper around AdamW): fp32 master ``4P`` + two fp32 moments
  ``8P`` + a 4-byte step counter. With ``offload_optimizer`` these, the gradient partition and the
  step's temporaries are in CPU memory and count 0 here.
* The reduce bucket, allocated whole at start-up: ``reduce_bucket_size x B``.

Transient, on top of the resident state; the peak is the largest phase:

* **load**: quantized models skip ``zero.Init``, so each rank holds the full 4-bit model
  (``0.5 x weights``), the quant state, the full unquantized parameters, the full fp32 LoRA weights
  (PEFT creates adapters in fp32) and one projection being quantized (``out x in x B``) before
  ``deepspeed.initialize`` partitions them. More nodes do not lower it. Without quantization the
  model is built partitioned under ``zero.Init``: resident shards plus the largest tensor.
* **forward/backward**: the input of every decoder layer ``L x b S h x B`` (the checkpoints;
  without checkpointing, plus every layer's saved activations), plus the larger of

  - the loss: fp32 log-softmax output and two fp32 gradients of the logits, ``12 b S V`` (the
    model-dtype logits and their fp32 copy are freed by then), and the final RMSNorm output kept
    by lm_head ``2 b S h B``, with lm_head gathered; and
  - one layer in backward: its saved activations, recomputed under checkpointing,
    ``b S (B ((3H+2K)d + 4I + m r + 3h) + [8h if B < 4])`` (q and k after RoPE, v, attention
    output and its head-masked copy; gate, up, SiLU, channel-masked product; the ``m`` LoRA A
    outputs; two RMSNorm outputs and the residual sum; the fp32 input copy each RMSNorm keeps in
    half precision; the ``taylor`` criterion also keeps the unmasked product, ``+ I``), plus the
    gradient of one MLP activation and either a second one or the dense projection bitsandbytes'
    4-bit matmul works on (``b S I B + max(b S I B, out in B)``), with the layer's largest tensor
    gathered.

  Gathers add the ZeRO-3 working set: the gathered tensor plus the prefetch bucket
  (``stage3_prefetch_bucket_size x B``), within ``stage3_max_live_parameters``. Attention is SDPA
  (flash / memory-efficient: no ``S x S`` scores); LoRA dropout is 0 (the default; dropout keeps a
  dropped copy of every adapted projection's input). Checked against the live tensor bytes of a real
  engine on tiny models (tests/test_plan.py); the GPU kernels may keep slightly different tensors.
* **scoring** (pipeline/pruning/importance.py, between backward and step, activations freed): the largest
  adapted projection dequantized to fp32 (``4 out in``), plus the larger of its ``B`` copy while
  converting and four fp32 ``chunk x in`` tensors of one chunk of ``ROW_CHUNK`` rows (merged
  weight, proxy gradient, their product, its absolute value), plus the gathered 4-bit projection
  and adapters (when not persistent) and their full fp32 gradients.
* **step**: the fp32 copy of the gradient partition handed to AdamW and two fp32 temporaries of
  torch's foreach AdamW (measured), ``12P``.

A reserve (``--reserve-gb``: CUDA context, NCCL buffers, allocator fragmentation) is added to the
peak phase; the plan fits when that total is at most the GPU memory.

Communication
-------------
Volumes are payloads (bytes of the full tensors a collective produces); per rank, a ring
all-gather or reduce-scatter moves ``payload x (W-1)/W`` in and out, an all-reduce twice that.
Persistent parameters are gathered once and not counted.

* Per micro-batch: one all-gather of every non-persistent parameter (4-bit base, embeddings,
  lm_head, LoRA) in forward and one in backward (the recompute reuses the backward gather, as
  ``stage3_max_reuse_distance`` keeps it), and one reduce-scatter of the LoRA gradients
  (``numel x B``). Per optimizer step: ``grad_accum x`` that.
* Per scoring event (every ``pruning.score_every`` steps): an all-gather of each adapted
  projection's 4-bit weight and adapters, an all-gather of the fp32 LoRA gradients
  (``safe_get_full_grad``: ``4 x numel``), and one all-reduce of the score vector,
  ``L x (2H + 2K + 3I)`` float64 (``ScoreLayout``); ``3 x adapted projections`` gathers in all.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline.errors import InputError, read_json
from pipeline.model.structure import ATTN, MLP, Structure, structure_from_config

MODULES = ATTN + MLP
ROW_CHUNK = 4096  # pipeline/pruning/importance.py _ROW_CHUNK (tested equal)
NF4_BLOCK = 64
NESTED_BLOCK = 256
GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

_LLAMA_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
_LLAMA_8B = {**_LLAMA_70B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32}
_LLAMA_8B.update(num_attention_heads=32)
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-70b": {**_LLAMA_70B, "vocab_size": 32000},
    "llama3-70b": {**_LLAMA_70B, "vocab_size": 128256},
    "llama2-7b": {**_LLAMA_8B, "intermediate_size": 11008, "num_key_value_heads": 32, "vocab_size": 32000},
    "llama3-8b": {**_LLAMA_8B, "vocab_size": 128256},
}

# DeepSpeed's defaults for the zero_optimization keys the plan reads.
_ZERO_DEFAULTS = {
    "stage3_param_persistence_threshold": 100_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "reduce_bucket_size": 500_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
}


class PlanError(InputError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    name: str
    structure: Structure
    vocab_size: int
    tied: bool


def load_model_spec(spec: str) -> ModelSpec:
    """A preset name, a Hugging Face model directory, or a config.json path."""
    if spec in PRESETS:
        cfg, name = PRESETS[spec], spec
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"--model {spec}: not a preset ({', '.join(PRESETS)}), model directory or config.json")
        cfg = read_json(path, str(path), PlanError)
        name = str(path.parent if path.name == "config.json" else path)
        cfg = cfg.get("text_config", cfg) if "hidden_size" not in cfg else cfg
    if "vocab_size" not in cfg:
        raise PlanError(f"{name}: config has no vocab_size")
    return ModelSpec(
        name=name,
        structure=structure_from_config(SimpleNamespace(**cfg)),
        vocab_size=int(cfg["vocab_size"]),
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )


@dataclass(frozen=True)
class ZeroSettings:
    persistence_threshold: int = _ZERO_DEFAULTS["stage3_param_persistence_threshold"]
    prefetch_bucket: int = _ZERO_DEFAULTS["stage3_prefetch_bucket_size"]
    reduce_bucket: int = _ZERO_DEFAULTS["reduce_bucket_size"]
    max_live: int = _ZERO_DEFAULTS["stage3_max_live_parameters"]
    offload_optimizer: bool = False  # fp32 master, moments and gradient partitions live on the CPU
    source: str = "DeepSpeed defaults"

    @classmethod
    def from_ds_config(cls, path: str | Path) -> ZeroSettings:
        path = Path(path)
        d = read_json(path, f"--ds-config {path}", PlanError)
        if not isinstance(d, dict) or not isinstance(d.get("zero_optimization", {}), dict):
            raise PlanError(
                f"--ds-config {path}: expected a JSON object with a zero_optimization object (as ds_configs/zero3.json)"
            )
        zero = d.get("zero_optimization", {})
        if zero.get("stage") != 3:
            raise PlanError(f"--ds-config {path}: the pipeline plans ZeRO stage 3, found stage {zero.get('stage')}")
        v = {k: int(zero.get(k, default)) for k, default in _ZERO_DEFAULTS.items()}
        return cls(
            persistence_threshold=v["stage3_param_persistence_threshold"],
            prefetch_bucket=v["stage3_prefetch_bucket_size"],
            reduce_bucket=v["reduce_bucket_size"],
            max_live=v["stage3_max_live_parameters"],
            offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none",
            source=str(path),
        )


@dataclass(frozen=True)
class Settings:
    nodes: int = 1
    gpus_per_node: int = 8
    seq_len: int = 2048
    micro_batch: int = 1
    grad_accum: int = 1
    lora_r: int = 8
    target_modules: tuple[str, ...] = MODULES
    dtype: str = "bf16"
    quantization: str = "nf4"  # nf4 | none
    double_quant: bool = True
    gradient_checkpointing: bool = True
    gpu_mem_gb: float = 80.0  # GiB
    reserve_gb: float = 4.0  # GiB: CUDA context, NCCL buffers, fragmentation
    score_every: int = 1
    link_gbps: float = 25.0  # GB/s per rank on the slowest link (200 Gb/s InfiniBand per GPU)
    zero: ZeroSettings = field(default_factory=ZeroSettings)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        positive = ("nodes", "gpus_per_node", "seq_len", "micro_batch", "grad_accum", "lora_r", "score_every")
        errs = [f"{k}={getattr(self, k)}: must be >= 1" for k in positive if getattr(self, k) < 1]
        if self.dtype not in DTYPE_BYTES:
            errs.append(f"dtype={self.dtype}: one of {', '.join(DTYPE_BYTES)}")
        if self.quantization not in ("nf4", "none"):
            errs.append(f"quantization={self.quantization}: nf4 or none")
        bad = [m for m in self.target_modules if m not in MODULES]
        if bad or not self.target_modules:
            errs.append(f"target_modules={list(self.target_modules)}: a non-empty subset of {', '.join(MODULES)}")
        # NaN fails every comparison, so these are written as "not (x > 0)".
        for key in ("gpu_mem_gb", "link_gbps"):
            if not getattr(self, key) > 0 or getattr(self, key) == float("inf"):
                errs.append(f"{key}={getattr(self, key)}: must be a finite number > 0")
        if not self.reserve_gb >= 0 or self.reserve_gb == float("inf"):
            errs.append(f"reserve_gb={self.reserve_gb}: must be a finite number >= 0")
        if errs:
            raise PlanError("; ".join(errs))


@dataclass(frozen=True)
class Tensor:
    """One parameter as ZeRO-3 sees it: ``numel`` elements of ``elem`` bytes; ``weights`` logical weights."""

    kind: str  # base | unq | lora
    name: str
    numel: int
    elem: int
    weights: int
    layer: int = -1  # -1: embeddings, final norm, lm_head
    shape: tuple[int, int] = (0, 0)  # (out, in) of a projection


def projections(s: Structure) -> dict[str, tuple[int, int]]:
    h, d, i = s.hidden_size, s.head_dim, s.intermediate_size
    q, kv = s.num_heads * d, s.num_kv_heads * d
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def inventory(m: ModelSpec, st: Settings) -> list[Tensor]:
    """Every parameter tensor of the PEFT model, per layer and global, as the engine holds it."""
    s, B = m.structure, DTYPE_BYTES[st.dtype]
    out: list[Tensor] = []
    for layer in range(s.num_layers):
        for name, (o, i) in projections(s).items():
            n = o * i
            numel = math.ceil(n / 2 / B) if st.quantization == "nf4" else n
            out.append(Tensor("base", f"{layer}.{name}", numel, B, n, layer, (o, i)))
            if s.attn_bias and name in ("q_proj", "k_proj", "v_proj"):
                out.append(Tensor("unq", f"{layer}.{name}.bias", o, B, o, layer))
            if name in st.target_modules:
                r = st.lora_r
                out.append(Tensor("lora", f"{layer}.{name}.lora_A", r * i, B, r * i, layer))
                out.append(Tensor("lora", f"{layer}.{name}.lora_B", o * r, B, o * r, layer))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.append(Tensor("unq", f"{layer}.{norm}", s.hidden_size, B, s.hidden_size, layer))
    emb = m.vocab_size * s.hidden_size
    out.append(Tensor("unq", "embed_tokens", emb, B, emb))
    out.append(Tensor("unq", "norm", s.hidden_size, B, s.hidden_size))
    if not m.tied:
        out.append(Tensor("unq", "lm_head", emb, B, emb))
    return out


def quant_state_bytes(weights: int, double_quant: bool) -> int:
    blocks = math.ceil(weights / NF4_BLOCK)
    if double_quant:
        return blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 16 * 4 + 256 * 4
    return 4 * blocks + 16 * 4


def score_vector_len(s: Structure) -> int:
    """Entries of the all-reduced score vector (pipeline/pruning/importance.py ScoreLayout.numel)."""
    return s.num_layers * (2 * s.num_heads + 2 * s.num_kv_heads + 3 * s.intermediate_size)


@dataclass
class Plan:
    model: ModelSpec
    settings: Settings
    memory: list[tuple[str, str, float]]  # (group, label, bytes)
    phases: dict[str, float]  # phase -> bytes at its peak
    comm: list[tuple[str, str, float, float]]  # (group, label, payload bytes, per-rank bytes)
    notes: list[str]

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    @property
    def total(self) -> float:
        return self.phases[self.peak_phase] + self.settings.reserve_gb * GIB

    @property
    def fits(self) -> bool:
        return self.total <= self.settings.gpu_mem_gb * GIB

    def item(self, label: str) -> float:
        return next(v for _, k, v in self.memory if k == label)


def plan(m: ModelSpec, st: Settings) -> Plan:
    st.check()
    s, B, W, z = m.structure, DTYPE_BYTES[st.dtype], st.world, st.zero
    tensors = inventory(m, st)
    nf4 = st.quantization == "nf4"

    def persistent(t: Tensor) -> bool:
        return t.numel <= z.persistence_threshold

    def shard(t: Tensor) -> int:
        return t.elem * (math.ceil(t.numel / W) + (t.numel if W > 1 and persistent(t) else 0))

    def total(kind: str, f: Any = None) -> int:
        return sum((f or (lambda t: t.numel * t.elem))(t) for t in tensors if t.kind == kind)

    base = [t for t in tensors if t.kind == "base"]
    lora_part = sum(math.ceil(t.numel / W) for t in tensors if t.kind == "lora")
    qstate = sum(quant_state_bytes(t.weights, st.double_quant) for t in base) if nf4 else 0

    mem: list[tuple[str, str, float]] = []
    resident = {
        "4-bit base, ZeRO-3 shard" if nf4 else "base weights, ZeRO-3 shard": total("base", shard),
        "NF4 quant state (replicated)": qstate,
        "embeddings, lm_head, norms: shard": total("unq", shard),
        "LoRA weights: shard": total("lora", shard),
        "LoRA gradient partition": 0 if z.offload_optimizer else lora_part * B,
        "Adam: fp32 master + 2 moments": 0 if z.offload_optimizer else lora_part * 12 + 4,
        "ZeRO-3 reduce bucket": z.reduce_bucket * B,
    }
    mem += [("resident", k, v) for k, v in resident.items()]
    res = sum(resident.values())

    # Tensors ZeRO-3 gathers at every use (persistent ones stay gathered; a world of one gathers nothing).
    gathered = {t for t in tensors if W > 1 and not persistent(t)}
    everything = sum(t.numel * t.elem for t in gathered)

    def gather_ws(largest: int) -> int:
        """The tensor in use plus the prefetch bucket, within stage3_max_live_parameters and the model."""
        return min(largest + z.prefetch_bucket * B, max(z.max_live * B, largest), everything) if largest else 0

    tokens = st.micro_batch * st.seq_len
    h, d, inter = s.hidden_size, s.head_dim, s.intermediate_size
    # Saved for backward by one decoder layer, per token: q and k after RoPE, v, the attention
    # output and its head-masked copy (o_proj input); gate, up, SiLU and the channel-masked product;
    # LoRA A outputs; both RMSNorm outputs and the residual sum; with B < 4 each RMSNorm also keeps
    # its fp32 input copy.
    attn = (3 * s.num_heads + 2 * s.num_kv_heads) * d
    per_token = B * (attn + 4 * inter + len(st.target_modules) * st.lora_r + 3 * h)
    layer_saved = tokens * (per_token + (8 * h if B < 4 else 0))
    largest_proj = max(o * i for o, i in projections(s).values())
    dense = largest_proj * B if nf4 else 0  # bitsandbytes' 4-bit matmul runs on a dequantized copy
    # In backward: the gradient of one MLP activation plus a second one or the dense projection.
    backward = tokens * inter * B + max(tokens * inter * B, dense)
    layer_ws = gather_ws(max((t.numel * t.elem for t in gathered if t.layer >= 0), default=0))
    inputs = s.num_layers * tokens * h * B
    if st.gradient_checkpointing:
        saved, layer_phase = inputs, layer_saved + backward + layer_ws
        mem.append(("forward/backward", "checkpointed layer inputs", saved))
    else:
        saved, layer_phase = inputs + s.num_layers * layer_saved, backward + layer_ws
        mem.append(("forward/backward", "activations of every layer (no checkpointing)", saved))
    # Log-softmax output and two gradients of the logits in fp32 (the model-dtype logits and
    # their fp32 copy are gone by then), plus the final RMSNorm output that lm_head keeps.
    head = next(t for t in tensors if t.name == ("embed_tokens" if m.tied else "lm_head"))
    loss_phase = 12 * tokens * m.vocab_size + 2 * tokens * h * B
    loss_phase += gather_ws(head.numel * head.elem if head in gathered else 0)
    mem.append(("forward/backward", "loss: fp32 log-softmax and logit gradients, lm_head gathered", loss_phase))
    mem.append(("forward/backward", "one layer in backward: recompute, gradients, gather, dense", layer_phase))
    train = res + saved + max(loss_phase, layer_phase)

    scored = [t for t in base if t.name.split(".", 1)[1] in st.target_modules]
    lora_of = {t.name: t for t in tensors if t.kind == "lora"}
    score_t = 0
    for t in scored:
        o, i = t.shape
        chunk = min(o, ROW_CHUNK) * i
        adapters = [lora_of[f"{t.name}.lora_A"], lora_of[f"{t.name}.lora_B"]]
        gathered_now = sum(x.numel * x.elem for x in (t, *adapters) if x in gathered)
        full_grads = 4 * sum(x.numel for x in adapters)
        # fp32 dense weight + (its B source while converting | four fp32 chunk tensors)
        score_t = max(score_t, 4 * o * i + max(B * o * i, 4 * 4 * chunk) + gathered_now + full_grads)
    mem.append(("scoring", "one projection in fp32 + proxy chunks + its gathers", score_t))
    # fp32 gradient partition + two fp32 temporaries of torch's foreach AdamW (on the CPU when offloaded)
    step_t = 0 if z.offload_optimizer else 12 * lora_part
    mem.append(("step", "fp32 gradient partition + AdamW temporaries", step_t))

    full4 = sum(t.numel * t.elem for t in base)
    if nf4:
        load = full4 + qstate + total("unq") + 4 * sum(t.weights for t in tensors if t.kind == "lora")
        load += largest_proj * B
        mem.append(("load", "full 4-bit model + unquantized + fp32 LoRA on each rank", load))
    else:
        load = res - resident["ZeRO-3 reduce bucket"] + largest_proj * B
        mem.append(("load", "zero.Init: shards + the largest tensor", load))

    phases = {"load": float(load), "train": float(train), "score": float(res + score_t), "step": float(res + step_t)}

    # Communication.
    ring = (W - 1) / W
    gather_payload = sum(t.numel * t.elem for t in gathered)
    lora_numel = sum(t.numel for t in tensors if t.kind == "lora")
    rs = lora_numel * B if W > 1 else 0
    comm: list[tuple[str, str, float, float]] = [
        ("micro-batch", "all-gather of non-persistent params, forward", gather_payload, gather_payload * ring),
        ("micro-batch", "all-gather again, backward (with recompute)", gather_payload, gather_payload * ring),
        ("micro-batch", "reduce-scatter of LoRA gradients", rs, rs * ring),
    ]
    per_step = sum(c[3] for c in comm) * st.grad_accum
    comm.append(("optimizer step", f"total over {st.grad_accum} micro-batch(es)", 0.0, per_step))
    adapters = [t for t in tensors if t.kind == "lora" and t.name.rsplit(".", 1)[0] in {x.name for x in scored}]
    score_gather = sum(t.numel * t.elem for t in (*scored, *adapters) if t in gathered)
    grads = 4 * sum(t.numel for t in adapters) if W > 1 else 0
    vec = score_vector_len(s) * 8 if W > 1 else 0
    comm += [
        ("scoring event", "all-gather of adapted 4-bit projections + LoRA", score_gather, score_gather * ring),
        ("scoring event", "all-gather of LoRA gradients (fp32)", grads, grads * ring),
        ("scoring event", f"all-reduce of the score vector ({score_vector_len(s):,} x float64)", vec, 2 * vec * ring),
    ]
    per_event = sum(c[3] for c in comm if c[0] == "scoring event")
    comm.append(("scoring event", f"averaged per step (score_every={st.score_every})", 0.0, per_event / st.score_every))
    seconds = (per_step + per_event / st.score_every) / (st.link_gbps * 1e9)
    notes = [
        f"communication ~{seconds:.1f} s per optimizer step at {st.link_gbps:g} GB/s per rank, no overlap "
        "(--link-gbps: the slowest link a ring crosses; inter-node when nodes > 1)",
        f"{3 * len(scored):,} gathers per scoring event (3 per adapted projection); latency-bound on many nodes",
    ]
    if phases["load"] >= max(phases["train"], phases["score"]) and nf4:
        notes.append(
            "the load phase is the peak: each rank holds the whole 4-bit model before partitioning, "
            "so more nodes do not lower it"
        )
    return Plan(m, st, mem, phases, comm, notes)


def _gib(x: float) -> str:
    return f"{x / GIB:9.2f}"


def _size(x: float) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= div:
            return f"{x / div:8.2f} {unit}"
    return f"{x:8.0f} B  "


def format_plan(p: Plan) -> str:
    m, st, s = p.model, p.settings, p.model.structure
    lines = [
        f"model {m.name}: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_heads}/{s.num_kv_heads} heads "
        f"x {s.head_dim}, MLP {s.intermediate_size}, vocab {m.vocab_size}",
        f"world {st.world} = {st.nodes} node(s) x {st.gpus_per_node} GPU(s); micro-batch {st.micro_batch} x "
        f"seq {st.seq_len}, grad accum {st.grad_accum}; LoRA r={st.lora_r} on "
        f"{','.join(m.removesuffix('_proj') for m in st.target_modules)}; {st.dtype}; "
        + (f"NF4{' double-quant' if st.double_quant else ''}" if st.quantization == "nf4" else "no quantization")
        + f"; gradient checkpointing {'on' if st.gradient_checkpointing else 'off'}",
        f"ZeRO-3 ({st.zero.source}): persistence threshold {st.zero.persistence_threshold:,}, prefetch bucket "
        f"{st.zero.prefetch_bucket:,}, reduce bucket {st.zero.reduce_bucket:,} elements",
        "",
        f"{'memory per GPU':<64}{'GiB':>9}",
    ]
    group = None
    for g, label, v in p.memory:
        if g != group:
            lines.append(f"  {g}")
            group = g
        lines.append(f"    {label:<60}{_gib(v)}")
    lines.append("  peak of each phase (resident + transient)")
    for k, v in p.phases.items():
        mark = "  <- peak" if k == p.peak_phase else ""
        lines.append(f"    {k:<60}{_gib(v)}{mark}")
    lines.append(f"    {'reserve (CUDA context, NCCL, fragmentation)':<60}{_gib(st.reserve_gb * GIB)}")
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"  {'total per GPU':<62}{_gib(p.total)}   of {st.gpu_mem_gb:g} GiB: {verdict}")
    lines += ["", f"{'communication per rank':<64}{'payload':>12}{'moved/rank':>14}"]
    group = None
    for g, label, payload, per_rank in p.comm:
        if g != group:
            lines.append(f"  per {g}")
            group = g
        lines.append(f"    {label:<60}{_size(payload) if payload else '':>12}{_size(per_rank):>14}")
    lines += ["", *(f"note: {n}" for n in p.notes)]
    return "\n".join(lines)


def plan_dict(p: Plan) -> dict[str, Any]:
    """Machine-readable plan (tools/plan.py --json)."""
    return {
        "model": p.model.name,
        "settings": {k: v for k, v in dataclasses.asdict(p.settings).items() if k != "zero"}
        | {"zero": dataclasses.asdict(p.settings.zero)},
        "memory_bytes": [{"group": g, "item": k, "bytes": v} for g, k, v in p.memory],
        "phases_bytes": p.phases,
        "peak_phase": p.peak_phase,
        "total_bytes": p.total,
        "fits": p.fits,
        "comm_bytes": [{"scope": g, "item": k, "payload": a, "per_rank": b} for g, k, a, b in p.comm],
    }
