"""Fast IDEFICS decoding: the transformers model's own modules and weights, called the gpt-fast way.

`model.generate` recomputes the image keys/values of every gated cross-attention block at every step, grows a
dynamic cache, and cannot be compiled. `FastDecoder` keeps the model (so LoRA, quantization and loading stay as
they are) but runs its layers itself with
- a preallocated key/value cache with one slot per concurrent request, sized from the memory left after loading
  (`FastDecoder.sized`, model/memory.py: up to `max_batch` slots, the full context or a shorter one);
- the image keys/values of every cross-attention block computed once, at prefill, and kept in the slot;
- on CUDA, the decode step compiled with `torch.compile(mode="reduce-overhead")` (CUDA graphs), on a few static
  shapes.

Active requests occupy slots 0..n-1 (a finished request's slot is refilled by moving the last one), and each
slot holds its own tokens from column 0: no padding token is ever computed, and a request sees exactly the
positions and keys it would see alone; other slots only ever meet it as masked-out columns.

LoRA: a prefill runs with the adapter the model has selected (PEFT); the slot then keeps that adapter and scale for
its decode steps (rowlora.py), so one decode step serves rows with different adapters and scales.
"""

import logging
import threading
from collections import defaultdict

import torch
import torch.nn.functional as F

from idefics_cog.inputs.prompt import Encoded
from idefics_cog.model.memory import CachePlan, cache_budget, cache_bytes, image_tokens, plan_cache
from idefics_cog.serving.failures import device_lost, out_of_memory
from idefics_cog.serving.rowlora import RowLora

__all__ = ["FastDecoder", "cache_bytes", "cache_plan", "unwrap"]

log = logging.getLogger(__name__)


def cuda_graphs_on_this_thread() -> None:
    """Let CUDA graph trees (torch.compile's reduce-overhead mode) run on the engine's own thread. They keep their
    state per thread and set it up only in the thread that imported them (and in autograd's); on any other thread
    their first replay fails an assertion (seen on an H200, torch 2.11). This gives this thread that state. The
    pinned torch 2.13 sets it up itself on any thread (cudagraph_trees.get_obj), so there this does nothing; it stays
    for the GPU machines' own older torch that bench/gpu.sh runs on (private torch names: skipped when absent)."""
    try:
        from torch._inductor.cudagraph_trees import local
    except (ImportError, AttributeError):
        return
    if not hasattr(local, "tree_manager_containers"):
        local.tree_manager_containers = {}
        local.tree_manager_locks = defaultdict(threading.Lock)


def unwrap(model):
    """The IdeficsForVisionText2Text inside a PeftModel (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """IdeficsRMSNorm `norm` applied to `x` with the fused kernel (one op instead of seven, the same arithmetic:
    normalized in float32, cast to the weight's dtype, scaled by the weight)."""
    if x.dtype == norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    normalized = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normalized.to(norm.weight.dtype if norm.weight.dtype in (torch.float16, torch.bfloat16)
                                       else x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """IDEFICS's rotary position embedding (`apply_rotary_pos_emb`, the same arithmetic in fewer ops)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def cache_plan(model, max_batch: int, max_images: int, fraction: float) -> CachePlan:
    """The slots and context per slot for `model` on its device: from the GPU memory left after loading (a
    `fraction` of the total, memory.py), or, on the CPU, `max_batch` slots of the full context."""
    base = unwrap(model)
    budget = None
    if base.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(base.device)
        budget = cache_budget(free, total, fraction)
    return plan_cache(base.config, max_batch, max_images, base.dtype.itemsize, budget)


class FastDecoder:
    def __init__(self, model, max_batch: int, max_images: int, compile: bool | None = None,
                 context: int | None = None):
        """`max_batch` slots of `context` tokens each (default: the model's full context)."""
        base = unwrap(model)
        config, self.device, self.dtype = base.config, base.device, base.dtype
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.max_len, self.max_batch = min(context or config.max_position_embeddings,
                                           config.max_position_embeddings), max_batch
        self.cross_interval = config.cross_layer_interval
        per_image = image_tokens(config)
        self.per_image, self.image_capacity = per_image, max_images * per_image  # image tokens per slot
        layers, cross_layers = config.num_hidden_layers, config.num_hidden_layers // self.cross_interval
        shape = (self.max_batch, self.heads, self.max_len, self.head_dim)
        self.keys = torch.zeros(layers, *shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros_like(self.keys)
        shape = (self.max_batch, self.heads, self.image_capacity, self.head_dim)
        self.image_keys = torch.zeros(cross_layers, *shape, device=self.device, dtype=self.dtype)
        self.image_values = torch.zeros_like(self.image_keys)
        # What a decoded token attends to (the images of the prompt's last token), as an additive mask, and
        # whether it attends to any image at all (a text-only prompt's cross-attention output is zeroed).
        self.masked = torch.finfo(self.dtype).min
        self.image_mask = torch.full((self.max_batch, 1, 1, self.image_capacity), self.masked, device=self.device,
                                     dtype=self.dtype)
        self.image_gate = torch.zeros(self.max_batch, dtype=torch.bool, device=self.device)
        self.image_lengths = [0] * self.max_batch
        self.compiled = None
        compile = compile if compile is not None else self.device.type == "cuda"
        self.lora = RowLora(max_batch, self.device, static=compile)  # each slot's adapter and scale
        if compile:
            # The caches are updated in place inside the graph, so their addresses must never change.
            for cache in (self.keys, self.values, self.image_keys, self.image_values, self.image_mask,
                          self.image_gate):
                torch._dynamo.mark_static_address(cache)
            # Batch and length buckets compile once each (adapters are tensors the graph reads: switching is free).
            torch.compiler.config.recompile_limit = max(torch.compiler.config.recompile_limit, 64)
            self.compiled = torch.compile(self._decode, mode="reduce-overhead", dynamic=False)

    @classmethod
    def sized(cls, model, max_batch: int, max_images: int, fraction: float) -> "FastDecoder":
        """A decoder whose cache fits the memory left on the model's device (`cache_plan`); logs what it chose."""
        plan = cache_plan(model, max_batch, max_images, fraction)
        log.info("key/value cache: %s", plan)
        return cls(model, plan.slots, max_images, context=plan.context)

    def warm_up(self, model) -> int:
        """Compile (CUDA) the decode step for every batch bucket at the two shortest length buckets, the shapes
        short requests use, so that the first users do not wait for compilation; returns the shapes run. Run it
        with every slot free: what it writes into them, a slot's prefill rewrites before use."""
        if self.compiled is None:
            return 0
        batches = sorted({min(self.max_batch, 1 << i) for i in range(self.max_batch.bit_length() + 1)})
        positions = [p for p in (0, 256) if p < self.max_len]  # length buckets 256 and 512
        for position in positions:
            for batch in batches:
                self.decode(model, [0] * batch, [position] * batch)
        return len(batches) * len(positions)

    def fits(self, encoded: Encoded) -> bool:
        """Whether the request's images fit a slot (else it is served by `model.generate`)."""
        return encoded.pixel_values.shape[1] * self.per_image <= self.image_capacity

    # ---- prefill: one request, into `slot` ----

    @torch.inference_mode()
    def prefill(self, model, slot: int, encoded: Encoded) -> torch.Tensor:
        """Run the prompt, fill `slot`'s caches, and return the logits for the first new token (1, vocab)."""
        base = unwrap(model)
        inputs = encoded.to(self.device, self.dtype)
        ids = inputs["input_ids"]
        length = ids.shape[1]
        per_token = inputs["image_attention_mask"].bool()  # (1, tokens, images)
        cross = self._image_keys_values(base, inputs["pixel_values"], per_token)
        images = self._store_images(slot, cross)
        mask, gate = self._image_attention(per_token, images)

        def attend(layer, k, v):
            self.keys[layer, slot, :, :length] = k[0]
            self.values[layer, slot, :, :length] = v[0]
            return k, v, None  # causal attention over the prompt itself

        def cross_inputs(block):
            keys, values = cross[block] if cross else (None, None)
            return keys, values, mask, gate

        positions = torch.arange(length, device=self.device)[None]
        logits = self._forward(base, ids, positions, attend, cross_inputs, causal=True)[:, -1]
        self._ready(base, slot, mask, gate, images)
        return logits.float()

    # ---- chunked prefill: a long prompt run in pieces between decode steps (the same cache, the same positions) ----

    @torch.inference_mode()
    def prefill_images(self, model, slot: int, encoded: Encoded) -> None:
        """The first piece of a chunked prefill: the images' keys/values of every cross-attention block, into `slot`."""
        inputs = encoded.to(self.device, self.dtype)
        per_token = inputs["image_attention_mask"].bool()
        self._store_images(slot, self._image_keys_values(unwrap(model), inputs["pixel_values"], per_token))

    @torch.inference_mode()
    def prefill_chunk(self, model, slot: int, encoded: Encoded, start: int, end: int) -> torch.Tensor | None:
        """Prompt tokens start..end into `slot`, after tokens 0..start and `prefill_images`: they attend to the
        cached keys of the earlier tokens and to themselves causally. The logits for the first new token (1, vocab)
        once the prompt's last token has run, else None."""
        base = unwrap(model)
        inputs = encoded.to(self.device, self.dtype)
        images = self.image_lengths[slot]
        mask, gate = self._image_attention(inputs["image_attention_mask"].bool()[:, start:end], images)
        positions = torch.arange(start, end, device=self.device)[None]
        later = torch.arange(end, device=self.device)[None] > positions[0, :, None]  # (chunk, end): not yet seen
        causal = torch.zeros(1, 1, *later.shape, dtype=self.dtype, device=self.device).masked_fill(later, self.masked)

        def attend(layer, k, v):
            self.keys[layer, slot, :, start:end] = k[0]
            self.values[layer, slot, :, start:end] = v[0]
            return self.keys[layer, slot:slot + 1, :, :end], self.values[layer, slot:slot + 1, :, :end], causal

        def cross_inputs(block):
            if not images:
                return None, None, mask, gate
            return (self.image_keys[block, slot:slot + 1, :, :images], self.image_values[block, slot:slot + 1, :, :images],
                    mask, gate)

        ids = inputs["input_ids"][:, start:end]
        logits = self._forward(base, ids, positions, attend, cross_inputs, causal=False)[:, -1]
        if end < inputs["input_ids"].shape[1]:
            return None
        self._ready(base, slot, mask, gate, images)
        return logits.float()

    def _store_images(self, slot: int, cross: list) -> int:
        """Each cross-attention block's image keys/values into `slot`; returns their length (0: no image)."""
        images = cross[0][0].shape[2] if cross else 0
        self.image_lengths[slot] = images
        for block, (keys, values) in enumerate(cross):
            self.image_keys[block, slot, :, :images] = keys[0]
            self.image_values[block, slot, :, :images] = values[0]
        return images

    def _image_attention(self, per_token: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For prompt tokens whose `per_token` (1, tokens, images) says which images each sees: the additive mask
        (1, 1, tokens, image tokens) of their cross-attention, and whether each sees any image (1, tokens)."""
        if images:
            allowed = per_token.repeat_interleave(self.per_image, dim=2)[:, None]
        else:
            allowed = torch.zeros(1, 1, per_token.shape[1], 1, dtype=torch.bool, device=self.device)
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(~allowed, self.masked)
        return mask, allowed.any(-1)[:, 0]

    def _ready(self, base, slot: int, mask: torch.Tensor, gate: torch.Tensor, images: int) -> None:
        """After a prompt's last token: a decoded token attends to the images that token attends to, and the slot
        keeps the adapter the model has selected (the request's, selected before its prefill: Scheduler._start)."""
        self.image_mask[slot] = self.masked
        if images:
            self.image_mask[slot, 0, 0, :images] = mask[0, 0, -1]
        self.image_gate[slot] = bool(gate[0, -1])
        self.lora.capture(base, slot)

    def _image_keys_values(self, base, pixel_values: torch.Tensor, per_token: torch.Tensor) -> list:
        """Per cross-attention block, the image keys and values (1, heads, image tokens, head_dim); none when no
        token attends to an image (text only: the output of those blocks is zeroed anyway)."""
        if not per_token.any():
            return []
        inner = base.model
        batch, count = pixel_values.shape[:2]
        states = inner.vision_model(pixel_values=pixel_values.reshape(batch * count, *pixel_values.shape[2:]))
        states = states.last_hidden_state
        if base.config.use_resampler:
            states = inner.perceiver_resampler(states)
        states = states.reshape(batch, -1, states.shape[-1])
        cross = []
        for block in inner.gated_cross_attn_layers:
            attn = block.cross_attn
            keys, values = self._heads(attn.k_proj(states)), self._heads(attn.v_proj(states))
            if attn.qk_layer_norms:
                keys = attn.k_layer_norm(keys)
            cross.append((keys, values))
        return cross

    # ---- decode: one token for each active slot 0..n-1 ----

    @torch.inference_mode()
    def decode(self, model, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Logits (n, vocab) for the next token of slots 0..n-1, given their last token and its position."""
        count = len(tokens)
        self.lora.refresh(unwrap(model))  # layers PEFT wrapped since the last prefill get their banks first
        if self.compiled is not None:
            try:
                return self._decode_compiled(unwrap(model), tokens, positions)
            except Exception as exc:  # e.g. a quantized layer that cannot be captured: decode eagerly from now on
                if out_of_memory(exc) or device_lost(exc):  # not the graph's fault: the scheduler handles these
                    raise
                log.exception("compiled decode failed; decoding without torch.compile from now on")
                self.compiled = None
        ids = torch.tensor(tokens, device=self.device)[:, None]
        where = torch.tensor(positions, device=self.device)
        images = max(max(self.image_lengths[:count]), 1)
        return self._decode(unwrap(model), ids, where, max(positions) + 1, images).float()

    def _decode_compiled(self, base, tokens: list[int], positions: list[int]) -> torch.Tensor:
        count = len(tokens)
        # Few shapes, so few graphs are ever captured: the batch padded to a power of two (padding rows sit in free
        # slots, whose last column they overwrite; a slot's own decode rewrites it before use), and the attended cache
        # length rounded up to a power of two from 256 (reading all 2048 columns would cost a 9b 6% more per token).
        bucket = min(self.max_batch, 1 << (count - 1).bit_length())
        length = min(self.max_len, max(256, 1 << max(positions).bit_length()))
        ids = torch.zeros(bucket, 1, dtype=torch.long)
        ids[:count, 0] = torch.tensor(tokens)
        # Padding rows write the last cache column of a free slot: never a prompt's (one may be half prefilled).
        where = torch.full((bucket,), self.max_len - 1, dtype=torch.long)
        where[:count] = torch.tensor(positions)
        ids, where = ids.to(self.device, non_blocking=True), where.to(self.device, non_blocking=True)
        cuda_graphs_on_this_thread()
        logits = self.compiled(base, ids, where, length, self.image_capacity)
        return logits[:count].float().clone()  # the graph's output buffer is reused by the next replay

    def _decode(self, base, ids, positions, length: int, images: int) -> torch.Tensor:
        batch = ids.shape[0]
        rows = torch.arange(batch, device=ids.device)
        columns = torch.arange(length, device=ids.device)
        mask = torch.zeros(ids.shape[0], 1, 1, length, dtype=self.dtype, device=ids.device)
        mask = mask.masked_fill((columns[None] > positions[:, None])[:, None, None], self.masked)

        def attend(layer, k, v):
            keys, values = self.keys[layer, :batch], self.values[layer, :batch]  # views: slots 0..batch-1
            keys[rows, :, positions] = k[:, :, 0]
            values[rows, :, positions] = v[:, :, 0]
            return keys[:, :, :length], values[:, :, :length], mask

        def cross_inputs(block):
            return (self.image_keys[block, :batch, :, :images], self.image_values[block, :batch, :, :images],
                    self.image_mask[:batch, :, :, :images], self.image_gate[:batch, None])

        return self._forward(base, ids, positions[:, None], attend, cross_inputs, causal=False,
                             linear=self.lora.apply)[:, -1]

    def move(self, source: int, target: int) -> None:
        """Slot `source`'s request continues in slot `target` (after `target`'s request finished)."""
        for cache in (self.keys, self.values, self.image_keys, self.image_values):
            cache[:, target] = cache[:, source]
        self.image_mask[target], self.image_gate[target] = self.image_mask[source], self.image_gate[source]
        self.image_lengths[target] = self.image_lengths[source]
        self.lora.move(source, target)

    # ---- the model, layer by layer, as IdeficsModel.forward computes it ----

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def _forward(self, base, ids, positions, attend, cross_inputs, causal: bool, linear=None) -> torch.Tensor:
        """`linear(path, module, x)` applies the Linear layer at `path` (decode: with each row's adapter)."""
        linear = linear or (lambda path, module, x: module(x))
        inner = base.model
        x = inner.embed_tokens(ids)
        # Every layer's rotary embedding is the same function of the positions: computed once, not per layer.
        cos, sin = (t[:, None] for t in inner.layers[0].self_attn.rotary_emb(x, positions))
        for index, layer in enumerate(inner.layers):
            if index % self.cross_interval == 0:
                block = index // self.cross_interval
                x = self._cross_block(inner.gated_cross_attn_layers[block], f"gated_cross_attn_layers.{block}.", x,
                                      *cross_inputs(block), linear)
            attn, at = layer.self_attn, f"layers.{index}."
            h = rms_norm(layer.input_layernorm, x)
            q, k, v = (self._heads(linear(f"{at}self_attn.{name}", getattr(attn, name), h))
                       for name in ("q_proj", "k_proj", "v_proj"))
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            keys, values, mask = attend(index, k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal and mask is None,
                                                 scale=attn.scaling)
            x = x + linear(f"{at}self_attn.o_proj", attn.o_proj, out.transpose(1, 2).reshape(*x.shape[:2], -1))
            x = x + mlp(layer.mlp, f"{at}mlp.", rms_norm(layer.post_attention_layernorm, x), linear)
        return base.lm_head(rms_norm(inner.norm, x))

    def _cross_block(self, block, at, x, keys, values, mask, gate, linear) -> torch.Tensor:
        """IdeficsGatedCrossAttentionLayer with the image keys/values given (None: no token sees an image)."""
        if keys is not None:
            attn = block.cross_attn
            q = self._heads(linear(f"{at}cross_attn.q_proj", attn.q_proj, rms_norm(block.input_layernorm, x)))
            if attn.qk_layer_norms:
                q = rms_norm(attn.q_layer_norm, q)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            out = linear(f"{at}cross_attn.o_proj", attn.o_proj, out.transpose(1, 2).reshape(*x.shape[:2], -1))
            # Tokens that attend to no image get no cross-attention output, as in the model.
            x = x + block.act_cross_attn(block.alpha_cross_attn) * out.masked_fill(~gate[..., None], 0.0)
        dense = mlp(block.mlp, f"{at}mlp.", rms_norm(block.post_attention_layernorm, x), linear)
        return x + block.act_dense(block.alpha_dense) * dense


def mlp(module, at: str, x: torch.Tensor, linear) -> torch.Tensor:
    """IdeficsMLP, with each projection applied by `linear`."""
    gate, up = linear(f"{at}gate_proj", module.gate_proj, x), linear(f"{at}up_proj", module.up_proj, x)
    return linear(f"{at}down_proj", module.down_proj, module.act_fn(gate) * up)
