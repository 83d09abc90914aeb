"""IdeficsModel.forward layer by layer from the model's own modules and weights (gpt-fast's way: the KV cache and each
Linear given by the caller), with the lookups that keep a decode step one graph."""

import torch
import torch.nn.functional as F


class LayerByLayer:
    """A subclass has `base` (the IdeficsForVisionText2Text), `heads`, `head_dim` and `cross_interval`."""

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _forward(self, ids, positions, attend, cross_inputs, causal: bool, linear=None) -> torch.Tensor:
        """`linear(path, x)`: the Linear layer at `path` (default: the model's own, with PEFT's selected adapter)."""
        inner = self.base.model
        linear = linear or (lambda path, x: inner.get_submodule(path)(x))
        x = embed(inner.embed_tokens, ids)
        # The same rotary embedding for every layer: computed once.
        cos, sin = (t[:, None] for t in inner.layers[0].self_attn.rotary_emb(x, positions))
        for index, layer in enumerate(inner.layers):
            if index % self.cross_interval == 0:
                block = index // self.cross_interval
                x = self._cross_block(inner.gated_cross_attn_layers[block], f"gated_cross_attn_layers.{block}.", x,
                                      *cross_inputs(block), linear)
            attn, at = layer.self_attn, f"layers.{index}."
            h = rms_norm(layer.input_layernorm, x)
            q, k, v = (self._heads(linear(f"{at}self_attn.{name}", h)) for name in ("q_proj", "k_proj", "v_proj"))
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            keys, values, mask = attend(index, k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and mask is None,
                                                 scale=attn.scaling)
            x = x + linear(f"{at}self_attn.o_proj", out.transpose(1, 2).reshape(*x.shape[:2], -1))
            x = x + mlp(f"{at}mlp.", rms_norm(layer.post_attention_layernorm, x), layer.mlp.act_fn, linear)
        return self.base.lm_head(rms_norm(inner.norm, x))

    def _cross_block(self, block, at, x, keys, values, mask, gate, linear) -> torch.Tensor:
        """IdeficsGatedCrossAttentionLayer with the image keys/values given (None: no token sees an image)."""
        if keys is not None:
            attn = block.cross_attn
            q = self._heads(linear(f"{at}cross_attn.q_proj", rms_norm(block.input_layernorm, x)))
            if attn.qk_layer_norms:
                q = rms_norm(attn.q_layer_norm, q)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            out = linear(f"{at}cross_attn.o_proj", out.transpose(1, 2).reshape(*x.shape[:2], -1))
            # Tokens that attend to no image get no cross-attention output, as in the model.
            x = x + block.act_cross_attn(block.alpha_cross_attn) * out.masked_fill(~gate[..., None], 0.0)
        dense = mlp(f"{at}mlp.", rms_norm(block.post_attention_layernorm, x), block.mlp.act_fn, linear)
        return x + block.act_dense(block.alpha_dense) * dense


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """IdeficsRMSNorm with the fused kernel: one op instead of seven, the same arithmetic."""
    if x.dtype == norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    normalized = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normalized.to(norm.weight.dtype if norm.weight.dtype in (torch.float16, torch.bfloat16)
                                       else x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary_pos_emb`, the same arithmetic in fewer ops."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def mlp(at: str, x: torch.Tensor, act_fn, linear) -> torch.Tensor:
    gate, up = linear(f"{at}gate_proj", x), linear(f"{at}up_proj", x)
    return linear(f"{at}down_proj", act_fn(gate) * up)


def write_rows(kv_cache: torch.Tensor, layer: int, rows: torch.Tensor, positions: torch.Tensor,
               new: torch.Tensor) -> None:
    """kv_cache[layer, rows[i], :, positions[i]] = new[i], indexed on the whole cache: inductor writes a view's
    update back by copying the whole cache."""
    kv_cache[torch.full_like(rows, layer), rows, :, positions] = new


def embed(embedding, ids: torch.Tensor) -> torch.Tensor:
    """IdeficsDecoupledEmbedding without its `nonzero` (a data-dependent shape and a host sync): both tables looked
    up with clamped ids, the right one chosen per id."""
    if not embedding.num_additional_embeddings:
        return F.embedding(ids, embedding.weight)
    first = embedding.num_embeddings
    main = F.embedding(ids.clamp(max=first - 1), embedding.weight)
    added = embedding.additional_embedding((ids - first).clamp(min=0))
    return torch.where((ids >= first)[..., None], added, main)
