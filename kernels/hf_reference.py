"""The transformers LLaMA over our checkpoint's tensors: the reference the engine and its benchmark compare to.

It lives in kernels/ (which never imports agent/) so the decode benchmark can build it; agent.reference's
generator uses it too.
"""

from __future__ import annotations

import torch

from kernels.checkpoint import LlamaArch


def build_hf_llama(arch: LlamaArch, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device):
    """A transformers LlamaForCausalLM for `arch` whose parameters are `state_dict`'s tensors (assigned, not copied,
    where dtype and device already match; no random initialisation)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in arch.to_hf_config().items() if k != "torch_dtype"})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, strict=True, assign=True)
    # Buffers that are not in the state dict (rotary inv_freq) were created on meta: rebuild them on the device.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.to(device).eval()
