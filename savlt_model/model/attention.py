"""Self-attention with its projections as ``nn.Linear``, so LoRA on them is plain peft LoRA.

Why: open_clip's towers use ``nn.MultiheadAttention``, whose q/k/v projection is a bare
parameter. peft can only adapt it by merging ``s B A`` into the frozen weight before every
forward and subtracting it after. That (measured, ``benchmarks/bench_train_step.py``)
makes backward form full d x 3d and d x d weight gradients in every adapted block, skips
``lora_dropout`` entirely and, in peft 0.21, applies the out_proj delta twice. With the
projections as Linears, LoRA runs as ``W x + s B A dropout(x)``: gradients flow through the
rank-r path only and the frozen weights are never written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from savlt_model.errors import SavltError


class LinearAttention(nn.Module):
    """The same computation as a self-attention ``nn.MultiheadAttention`` (batch first)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not (mha.batch_first and mha._qkv_same_embed_dim) or mha.bias_k is not None:
            raise SavltError(
                "model.lora: only batch-first self-attention without add_bias_kv can take LoRA"
            )
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.qkv = nn.Linear(d, 3 * d, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(d, d, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.requires_grad_(mha.in_proj_weight.requires_grad)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """``nn.MultiheadAttention``'s call signature and output, for self-attention only."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("LinearAttention is self-attention: key and value must be the query")
        if need_weights:
            raise ValueError("LinearAttention does not return attention weights")
        b, n, d = query.shape
        q, k, v = self.qkv(query).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


def lora_targets(root: nn.Module, attention_modules: list[str]) -> list[str]:
    """The Linear projections of each named attention module, as peft LoRA targets.

    An ``nn.MultiheadAttention`` is replaced in place by an equivalent
    :class:`LinearAttention` first; a module that already has Linear projections (timm's
    ``Attention``: qkv, proj) is used as it is.
    """
    targets = []
    for name in attention_modules:
        module = root.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            module = LinearAttention(module)
            root.set_submodule(name, module)
        linears = [n for n, child in module.named_children() if isinstance(child, nn.Linear)]
        if not linears:
            raise SavltError(f"model.lora: {name} ({type(module).__name__}) has no Linear layers")
        targets += [f"{name}.{n}" for n in linears]
    return targets
