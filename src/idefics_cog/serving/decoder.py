"""The fast path: the model's own modules and weights run layer by layer (gpt-fast's way) with a preallocated KV
cache of one slot per request, image keys/values computed once at prefill, and a decode step that is one graph
(compiled and captured on CUDA), serving rows with different adapters (rowlora.py)."""

import logging
import time

import torch
from torch._dynamo.utils import counters

from idefics_cog.config import ADAPTER_BANK_RANK
from idefics_cog.inputs.prompt import Encoded
from idefics_cog.model.memory import ACTIVATIONS, KVCachePlan, kv_cache_budget, image_tokens, plan_kv_cache
from idefics_cog.serving.compiled import (
    Step,
    WarmUp,
    batch_bucket,
    buckets,
    compile_decision,
    compile_step,
    cuda_graphs_on_this_thread,
    length_bucket,
)
from idefics_cog.serving.layers import LayerByLayer, write_rows
from idefics_cog.serving.rowlora import RowLora, decode_linears

log = logging.getLogger(__name__)


def unwrap(model):
    """The IdeficsForVisionText2Text inside a PeftModel (PEFT injects LoRA layers into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def kv_cache_plan(model, max_batch: int, max_images: int, fraction: float, banks: int = 0) -> KVCachePlan:
    """From the GPU memory left after loading, less the LoRA banks' `banks` bytes; no budget on the CPU."""
    base, budget = unwrap(model), None
    if base.device.type == "cuda":
        budget = kv_cache_budget(*torch.cuda.mem_get_info(base.device), fraction, ACTIVATIONS + banks)
    return plan_kv_cache(base.config, max_batch, max_images, base.dtype.itemsize, budget)


class FastDecoder(LayerByLayer):
    def __init__(self, model, max_batch: int, max_images: int, compile: str | bool = "auto",
                 context_tokens: int | None = None, banned_ids: list[int] | None = None,
                 bank_rank: int = ADAPTER_BANK_RANK, backend="inductor"):
        """`compile`: "auto" (on CUDA), "on", "off" or a bool; `banned_ids`: never picked (the image tokens)."""
        base = self.base = unwrap(model)  # the same object once PEFT wraps the model
        # Frozen now, as PEFT will: the compiled step's guards check `requires_grad`, a change would recompile.
        base.requires_grad_(False)
        config, self.device, self.dtype = base.config, base.device, base.dtype
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.max_len, self.max_batch = min(context_tokens or config.max_position_embeddings,
                                           config.max_position_embeddings), max_batch
        self.cross_interval = config.cross_layer_interval
        per_image = image_tokens(config)
        self.per_image, self.image_capacity = per_image, max_images * per_image  # image tokens per slot
        layers, cross_layers = config.num_hidden_layers, config.num_hidden_layers // self.cross_interval
        # One spare column past the context, where the padding rows of a compiled step write.
        shape = (self.max_batch, self.heads, self.max_len + 1, self.head_dim)
        self.keys = torch.zeros(layers, *shape, device=self.device, dtype=self.dtype)
        self.values = torch.zeros_like(self.keys)
        shape = (self.max_batch, self.heads, self.image_capacity, self.head_dim)
        self.image_keys = torch.zeros(cross_layers, *shape, device=self.device, dtype=self.dtype)
        self.image_values = torch.zeros_like(self.image_keys)
        # A decoded token sees the images of its prompt's last token; a text-only prompt's cross-attention is zeroed.
        self.masked = torch.finfo(self.dtype).min
        self.image_mask = torch.full((self.max_batch, 1, 1, self.image_capacity), self.masked, device=self.device,
                                     dtype=self.dtype)
        self.image_gate = torch.zeros(self.max_batch, dtype=torch.bool, device=self.device)
        self.image_lengths = [0] * self.max_batch
        # The step's inputs, kept on the device; the host copies them in only when the batch changes.
        self.ids = torch.zeros(self.max_batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.full((self.max_batch,), self.max_len, dtype=torch.long, device=self.device)
        self.held: tuple[list, list] = ([], [])  # what `ids` and `positions` hold for the rows, as the host knows it
        self.banned = torch.tensor(banned_ids or [], dtype=torch.long, device=self.device)
        compiled, self.step_mode_reason = compile_decision(base, compile)
        self.step_mode = "compiled" if compiled else "eager"
        self.lora = RowLora(decode_linears(base.model), max_batch, bank_rank, self.device, self.dtype,
                            static=compiled)
        static = (self.keys, self.values, self.image_keys, self.image_values, self.image_mask, self.image_gate,
                  self.ids, self.positions, self.banned)
        self.compiled = compile_step(self._step, self.device, backend, static) if compiled else None

    @classmethod
    def sized(cls, model, max_batch: int, max_images: int, fraction: float, **options) -> "FastDecoder":
        """A decoder whose KV cache fits the memory left on the model's device."""
        banks = RowLora.bytes(unwrap(model), options.get("bank_rank", ADAPTER_BANK_RANK), max_batch)
        plan = kv_cache_plan(model, max_batch, max_images, fraction, banks)
        log.info("key/value cache: %s", plan)
        decoder = cls(model, plan.slots, max_images, context_tokens=plan.context_tokens, **options)
        log.info("decode step: %s (%s)", decoder.step_mode, decoder.step_mode_reason)
        return decoder

    @torch.inference_mode()  # as `decode` runs: grad mode is part of the compiled step's guards
    def warm_up(self, model) -> "WarmUp":
        """Compile and run the decode step at every batch and length bucket, with every slot free, so that
        nothing compiles while serving."""
        if self.compiled is None:
            return WarmUp(0, 0, 0.0)
        started, graphs = time.perf_counter(), counters["stats"]["unique_graphs"]
        shapes = buckets(self.max_batch, self.max_len)
        # Three graphs: the first shape, then batch and length dynamic, and the step without the LoRA banks.
        # CUDA graphs are recorded at a shape's second run: two runs each.
        for columns in (self.lora.bank_rank, 0):
            for batch, length in [shapes[0], *shapes[:0:-1]] * 2:
                self._hold([0] * batch, [length - 1] * batch)
                self._run(batch, length, columns)
        self.held = ([], [])
        warm = WarmUp(len(shapes), counters["stats"]["unique_graphs"] - graphs, time.perf_counter() - started)
        log.info("decode step compiled: %d graph(s), %d batch x length shapes run, in %.1f s", warm.graphs,
                 warm.shapes, warm.seconds)
        return warm

    def fits(self, encoded: Encoded) -> bool:
        """Whether the request's images fit a slot (else model.generate serves it)."""
        return encoded.pixel_values.shape[1] * self.per_image <= self.image_capacity

    # ---- prefill: one request, into `slot` ----

    @torch.inference_mode()
    def prefill(self, model, slot: int, encoded: Encoded) -> torch.Tensor:
        """The logits for the first new token (1, vocab)."""
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
        logits = self._forward(ids, positions, attend, cross_inputs, causal=True)[:, -1]
        self._ready(base, slot, mask, gate, images)
        return logits.float()

    # ---- prefill together: several requests in one forward, each into its own slot ----

    @torch.inference_mode()
    def prefill_together(self, model, slots: list[int], encodeds: list[Encoded]) -> list[torch.Tensor]:
        """`prefill` of each prompt into its slot in one forward: packed without padding, a block-diagonal causal
        mask, each token cross-attending to its own prompt's images only."""
        base = unwrap(model)
        inputs = [encoded.to(self.device, self.dtype) for encoded in encodeds]
        lengths = [x["input_ids"].shape[1] for x in inputs]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        total = sum(lengths)
        ids = torch.cat([x["input_ids"] for x in inputs], 1)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])[None]
        prompt = torch.repeat_interleave(torch.arange(len(lengths), device=self.device),
                                         torch.tensor(lengths, device=self.device))  # each token's prompt
        index = torch.arange(total, device=self.device)
        seen = (prompt[:, None] == prompt[None]) & (index[None] <= index[:, None])  # block-diagonal causal
        causal = self._additive(~seen)[None, None]
        per_token = [x["image_attention_mask"].bool() for x in inputs]  # (1, tokens, images) each
        with_images = [i for i, p in enumerate(per_token) if p.any()]  # the others' cross-attention is zeroed
        cross = self._image_keys_values(base, torch.cat([inputs[i]["pixel_values"] for i in with_images], 1)
                                        ) if with_images else []
        # Each prompt's image tokens are one range of the images' sequence.
        allowed = torch.zeros(total, max(cross[0][0].shape[2], 1) if cross else 1, dtype=torch.bool,
                              device=self.device)
        image_start, images = 0, [0] * len(inputs)
        for i in with_images:
            images[i] = per_token[i].shape[2] * self.per_image
            end = image_start + images[i]
            allowed[starts[i]:starts[i] + lengths[i], image_start:end] = per_token[i][0].repeat_interleave(
                self.per_image, dim=1)
            self._store_images(slots[i], [(k[:, :, image_start:end], v[:, :, image_start:end]) for k, v in cross])
            image_start = end
        for i in set(range(len(inputs))) - set(with_images):
            self._store_images(slots[i], [])
        mask = self._additive(~allowed)[None, None]
        gate = allowed.any(-1)[None]

        def attend(layer, k, v):
            for slot, start, length in zip(slots, starts, lengths):
                self.keys[layer, slot, :, :length] = k[0, :, start:start + length]
                self.values[layer, slot, :, :length] = v[0, :, start:start + length]
            return k, v, causal

        def cross_inputs(block):
            keys, values = cross[block] if cross else (None, None)
            return keys, values, mask, gate

        logits = self._forward(ids, positions, attend, cross_inputs, causal=False)
        results = []
        for slot, start, length, seeing, count in zip(slots, starts, lengths, per_token, images):
            self._ready(base, slot, *self._image_attention(seeing[:, -1:], count), count)  # its last token's images
            results.append(logits[:, start + length - 1].float())
        return results

    # ---- chunked prefill: a long prompt in chunks between decode steps ----

    @torch.inference_mode()
    def prefill_images(self, model, slot: int, encoded: Encoded) -> None:
        """The first chunk of a chunked prefill: the images' keys/values."""
        inputs = encoded.to(self.device, self.dtype)
        per_token = inputs["image_attention_mask"].bool()
        self._store_images(slot, self._image_keys_values(unwrap(model), inputs["pixel_values"], per_token))

    @torch.inference_mode()
    def prefill_chunk(self, model, slot: int, encoded: Encoded, start: int, end: int) -> torch.Tensor | None:
        """Prompt tokens start..end into `slot`; the first new token's logits after the last chunk, else None."""
        base = unwrap(model)
        inputs = encoded.to(self.device, self.dtype)
        images = self.image_lengths[slot]
        mask, gate = self._image_attention(inputs["image_attention_mask"].bool()[:, start:end], images)
        positions = torch.arange(start, end, device=self.device)[None]
        later = torch.arange(end, device=self.device)[None] > positions[0, :, None]  # (chunk, end): not yet seen
        causal = self._additive(later)[None, None]

        def attend(layer, k, v):
            self.keys[layer, slot, :, start:end] = k[0]
            self.values[layer, slot, :, start:end] = v[0]
            return self.keys[layer, slot:slot + 1, :, :end], self.values[layer, slot:slot + 1, :, :end], causal

        def cross_inputs(block):
            if not images:
                return None, None, mask, gate
            return (self.image_keys[block, slot:slot + 1, :, :images],
                    self.image_values[block, slot:slot + 1, :, :images], mask, gate)

        ids = inputs["input_ids"][:, start:end]
        logits = self._forward(ids, positions, attend, cross_inputs, causal=False)[:, -1]
        if end < inputs["input_ids"].shape[1]:
            return None
        self._ready(base, slot, mask, gate, images)
        return logits.float()

    def _store_images(self, slot: int, cross: list) -> int:
        """Returns their length (0: no image)."""
        images = cross[0][0].shape[2] if cross else 0
        self.image_lengths[slot] = images
        for block, (keys, values) in enumerate(cross):
            self.image_keys[block, slot, :, :images] = keys[0]
            self.image_values[block, slot, :, :images] = values[0]
        return images

    def _image_attention(self, per_token: torch.Tensor, images: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The additive cross-attention mask (1, 1, tokens, image tokens) and whether each token sees any image."""
        if images:
            allowed = per_token.repeat_interleave(self.per_image, dim=2)[:, None]
        else:
            allowed = torch.zeros(1, 1, per_token.shape[1], 1, dtype=torch.bool, device=self.device)
        return self._additive(~allowed), allowed.any(-1)[:, 0]

    def _additive(self, hidden: torch.Tensor) -> torch.Tensor:
        """0 where attended, the dtype's minimum where `hidden`."""
        return torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill(hidden, self.masked)

    def _ready(self, base, slot: int, mask: torch.Tensor, gate: torch.Tensor, images: int) -> None:
        """After a prompt's last token: the slot keeps that token's images and the adapter the model has selected."""
        self.image_mask[slot] = self.masked
        if images:
            self.image_mask[slot, 0, 0, :images] = mask[0, 0, -1]
        self.image_gate[slot] = bool(gate[0, -1])
        self.lora.capture(base, slot)

    def _image_keys_values(self, base, pixel_values: torch.Tensor, per_token: torch.Tensor | None = None) -> list:
        """Per cross-attention block (keys, values); none when no token attends to an image."""
        if per_token is not None and not per_token.any():
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
    def decode(self, model, tokens: list[int], positions: list[int]) -> "Step":
        """Float32 logits (banned ids at -inf) and argmax of slots 0..n-1. A failing step fails its rows; it never
        changes `step_mode`."""
        count = len(tokens)
        self._hold(tokens, positions)
        return self._run(count, max(positions) + 1, *self.lora.in_use(count))

    def _run(self, count: int, length: int, columns: int, layers: set | None = None) -> "Step":
        """With the LoRA banks' first `columns` (0: none)."""
        if self.compiled is None:  # no padding, no bucket, only the bank columns and layers in use
            return Step(*self._step(count, length, max(max(self.image_lengths[:count]), 1), columns, layers))
        cuda_graphs_on_this_thread()  # the banks whole (None) or not at all: two graphs
        logits, picked = self.compiled(batch_bucket(count, self.max_batch), length_bucket(length, self.max_len),
                                       self.image_capacity, None if columns else 0)
        # The next replay overwrites the graph's outputs, and the sampler works on the logits in place.
        return Step(logits[:count].clone(), picked[:count])

    def _hold(self, tokens: list[int], positions: list[int]) -> None:
        """Rows past these write their slot's spare column."""
        if self.held == (tokens, positions):
            return
        padding = self.max_batch - len(tokens)
        staged = torch.tensor([tokens + [0] * padding, positions + [self.max_len] * padding]).to(self.device)
        self.ids[:, 0].copy_(staged[0])
        self.positions.copy_(staged[1])
        self.held = (list(tokens), list(positions))

    def advance(self, tokens: torch.Tensor, picked: list) -> None:
        """A step's new tokens become the rows' next inputs, on the device."""
        count = len(picked)
        self.ids[:count, 0].copy_(tokens[:count])
        self.positions[:count] += 1
        self.held = (list(picked), [position + 1 for position in self.held[1][:count]])

    def _step(self, batch: int, length: int, images: int, columns: int | None = None,
              layers: set | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensors only (one graph, no host sync)."""
        ids, positions = self.ids[:batch], self.positions[:batch]
        rows = torch.arange(batch, device=self.device)
        later = torch.arange(length, device=self.device)[None] > positions[:, None]  # cache columns not yet seen
        mask = self._additive(later[:, None, None])

        def attend(layer, k, v):
            write_rows(self.keys, layer, rows, positions, k[:, :, 0])
            write_rows(self.values, layer, rows, positions, v[:, :, 0])
            return self.keys[layer, :batch, :, :length], self.values[layer, :batch, :, :length], mask

        def cross_inputs(block):
            return (self.image_keys[block, :batch, :, :images], self.image_values[block, :batch, :, :images],
                    self.image_mask[:batch, :, :, :images], self.image_gate[:batch, None])

        logits = self._forward(ids, positions[:, None], attend, cross_inputs, causal=False,
                               linear=lambda path, x: self.lora.apply(path, x, columns, layers))[:, -1].float()
        logits = logits.index_fill(1, self.banned, -float("inf"))
        return logits, logits.argmax(-1)

    def move(self, source: int, target: int) -> None:
        for kv_cache in (self.keys, self.values, self.image_keys, self.image_values):
            kv_cache[:, target] = kv_cache[:, source]
        self.image_mask[target], self.image_gate[target] = self.image_mask[source], self.image_gate[source]
        self.image_lengths[target] = self.image_lengths[source]
        self.lora.move(source, target)
