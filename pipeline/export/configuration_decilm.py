"""Config of the Nemotron-NAS (DeciLM) layout: a Llama decoder whose layers differ in width.

The exporter (``pipeline/export/compact.py``) copies this file and ``modeling_decilm.py`` next to a compact
model whose layers differ in width, and points ``auto_map`` here, so the directory loads with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``; vLLM's built-in
``nemotron_nas`` model (``DeciLMForCausalLM``) reads the same config.json. It imports only
transformers: it runs where this package is not installed.

``block_configs`` holds one entry per layer:
``{"attention": {"no_op", "replace_with_linear", "n_heads_in_group"}, "ffn": {"no_op", "replace_with_linear",
"intermediate_size"}}``. Every attention block has ``num_attention_heads`` query heads and
``num_attention_heads // n_heads_in_group`` KV heads; every MLP block its exact ``intermediate_size``
(written instead of ``ffn_mult``, which vLLM rounds up to a multiple of 256). ``qkv_bias`` gives the
q/k/v projections a bias, ``attention_bias`` the o_proj (as vLLM reads them); ``mlp_bias`` the MLP.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


class BlockSection(dict):
    """One block's attention or ffn settings: a dict (so config.json stays plain JSON) whose keys are
    also attributes, which is how vLLM reads them (``block.attention.no_op``); absent keys are
    absent attributes (vLLM tests ``hasattr(ffn, "ffn_mult")``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class BlockConfig(BlockSection):
    """One layer's block: ``attention`` and ``ffn`` sections, read as keys or attributes."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(attention=BlockSection(data.get("attention", {})), ffn=BlockSection(data.get("ffn", {})))


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    # Annotated fields of a strict dataclass config, like LlamaConfig's own.
    block_configs: list | None = None
    qkv_bias: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        blocks = self.block_configs
        if blocks is None:  # a plain Llama: every layer at the global widths
            blocks = [
                {
                    "attention": {
                        "no_op": False,
                        "replace_with_linear": False,
                        "n_heads_in_group": self.num_attention_heads // self.num_key_value_heads,
                    },
                    "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": self.intermediate_size},
                }
            ] * n
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(b) for b in blocks]
        problems = [] if len(self.block_configs) == n else [f"{len(self.block_configs)} block_configs for {n} layers"]
        for i, b in enumerate(self.block_configs):
            a, f = b.attention, b.ffn
            if a.get("replace_with_linear") or f.get("replace_with_linear"):
                problems.append(f"layer {i}: replace_with_linear is not supported")
            if not a.get("no_op"):
                g = a.get("n_heads_in_group")
                if not isinstance(g, int) or g < 1 or self.num_attention_heads % g:
                    problems.append(f"layer {i}: n_heads_in_group={g} does not divide {self.num_attention_heads} heads")
            if not f.get("no_op"):
                if "ffn_mult" in f:
                    problems.append(f"layer {i}: ffn_mult is not supported; give intermediate_size")
                elif not isinstance(f.get("intermediate_size"), int) or f["intermediate_size"] < 1:
                    problems.append(f"layer {i}: intermediate_size={f.get('intermediate_size')} is not a positive int")
        if problems:
            raise ValueError("block_configs: " + "; ".join(problems))

    def validate(self) -> None:
        """The stock validators but LlamaConfig's architecture check (hidden_size % num_attention_heads
        == 0), which does not apply: head_dim is given, and the block widths are checked above."""
        for validator in getattr(type(self), "__class_validators__", ()):
            if validator.__name__ != "validate_architecture":
                validator(self)

    def layer_widths(self, index: int) -> dict[str, Any]:
        """Per-layer config values of layer ``index`` (used by modeling_decilm.py)."""
        b = self.block_configs[index]
        widths: dict[str, Any] = {}
        if not b.attention.no_op:
            widths["num_key_value_heads"] = self.num_attention_heads // b.attention.n_heads_in_group
        if not b.ffn.no_op:
            widths["intermediate_size"] = b.ffn.intermediate_size
        return widths


__all__ = ["DeciLMConfig"]
