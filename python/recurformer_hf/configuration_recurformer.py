"""Configuration of a RecurFormer checkpoint for transformers (`trust_remote_code`).

A RecurFormer checkpoint's config.json is the base model's configuration (`model_type` "llama" or
"qwen2", read by the Rust engine) plus a `recurformer` section (plan, mixer settings, provenance;
`crates/recurformer/src/model/hybrid.rs`) and an `auto_map` that points transformers at this file
and `modeling_recurformer.py`. This class keeps every field as the checkpoint spells it, so
`to_dict()` writes back a config.json the Rust engine still reads.
"""

from transformers import PretrainedConfig


class RecurformerConfig(PretrainedConfig):
    model_type = "recurformer"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attention_bias=False,
        base_model_type=None,
        recurformer=None,
        **kwargs,
    ):
        # The base architecture decides the o_proj bias (Llama's `attention_bias` also biases
        # o_proj, Qwen2 never does: `llama.rs`). config.json names it in `model_type`, which this
        # class reports as "recurformer", so it is kept apart.
        kw_type = kwargs.pop("model_type", None)
        if base_model_type is None:
            base_model_type = kw_type if kw_type in ("llama", "mistral", "qwen2") else None
        if base_model_type is None:
            archs = kwargs.get("architectures") or []
            base_model_type = "qwen2" if any("Qwen2" in a for a in archs) else "llama"
        if base_model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"base model_type {base_model_type!r} is not supported (llama, mistral, qwen2)")
        self.base_model_type = base_model_type
        # transformers 5 puts the rope settings under `rope_parameters` (rope_theta inside); the
        # Rust engine writes `rope_theta` / `rope_scaling` at the top level: accept both. Kept
        # under `rope_scaling_params`, because `rope_scaling` is a property of transformers 5's
        # base class that rewrites it.
        rope_params = kwargs.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_scaling is None and rope_params.get("rope_type", "default") not in ("default", "none"):
                rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling_params = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = bool(attention_bias) or base_model_type == "qwen2"
        self.hidden_act = kwargs.pop("hidden_act", "silu")
        if recurformer is None:
            recurformer = empty_section(num_hidden_layers, self.num_attention_heads, self.num_key_value_heads)
        self.recurformer = recurformer
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        # config.json names the base architecture in `model_type` (for the Rust engine); read it as
        # `base_model_type`, so transformers does not take the checkpoint for another model's.
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") in ("llama", "mistral", "qwen2"):
            config_dict = dict(config_dict)
            config_dict["base_model_type"] = config_dict.pop("model_type")
        return config_dict, kwargs

    def to_dict(self):
        out = super().to_dict()
        # Written back under the base architecture's name, which the Rust engine reads.
        out["model_type"] = self.base_model_type
        out.pop("base_model_type", None)
        scaling = out.pop("rope_scaling_params", None)
        if scaling is not None:
            out["rope_scaling"] = scaling
        return out


def empty_section(layers, heads, kv_heads):
    """The `recurformer` section of a plan that replaces nothing (the base model)."""
    g = heads // kv_heads
    return {
        "format_version": 1,
        "plan": {
            "layers": [
                {
                    "layer": i,
                    "attention_groups": list(range(kv_heads)),
                    "attention_heads": list(range(heads)),
                    "mamba_groups": [],
                    "mamba_heads": [],
                }
                for i in range(layers)
            ],
        },
        "mixer": {"state_size": 0, "conv_kernel": 4},
        "init": "attention",
    }
