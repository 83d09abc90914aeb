"""Each decode row's own LoRA adapter and scale, so that requests with different adapters share a batch.

PEFT applies its active adapter to every row of a forward (its mixed-batch forward takes one scale per adapter, and
torch.compile would guard on its Python-side state). Here every LoRA layer of the decode path gets a bank: the A and B
matrices of the adapters in use, stacked in tensors of a fixed shape (bank slot 0 stays zero: the base model alone).
Each decode row reads its bank slot and its scale from tensors too, so switching adapters or `lora_scale` changes
values that a compiled decode step reads, never the step itself.

A row takes the adapter the model has selected when it is prefilled (`capture`): its matrices are copied into a bank
slot (or found there), and each layer's scaling (lora_alpha / r times lora_scale, as PEFT computed it) is kept for the
row. An adapter unloaded from the model later stays in its bank slot until no row uses it. The banks have room for
ADAPTERS_AT_FIRST adapters and double when more decode at once (then a compiled step compiles once more).
"""

from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

# Modules of the decode path only: a cross-attention block's keys and values come from the images, at prefill.
DECODE_PARTS = ("layers.", "gated_cross_attn_layers.")
PREFILL_ONLY = ("cross_attn.k_proj", "cross_attn.v_proj")
ADAPTERS_AT_FIRST = 4  # bank room at first; more adapters decoding at once grow it (one more compile on CUDA)


@dataclass
class Bank:
    """One LoRA layer's matrices for every bank slot (zero-padded to the largest rank), and its row in `scales`."""

    a: torch.Tensor  # (slots, rank, in_features)
    b: torch.Tensor  # (slots, out_features, rank)
    index: int


class RowLora:
    def __init__(self, max_batch: int, device: torch.device, static: bool = False,
                 adapters: int = ADAPTERS_AT_FIRST):
        self.max_batch, self.device, self.static = max_batch, device, static
        self.slots = min(adapters, max_batch) + 1  # slot 0 and room for `adapters`; at most one per row
        self.banks: dict[str, Bank] = {}  # module path under the IdeficsModel -> its bank
        self.layers: dict[str, LoraLayer] = {}
        self.adapters_seen: tuple = ()
        self.owners: list = [None] * self.slots  # bank slot -> (adapter name, its first lora_A weight)
        self.row_slots = [0] * max_batch  # each row's bank slot, and on the device:
        self.row_slot = self._static(torch.zeros(max_batch, dtype=torch.long, device=device))
        self.scales = self._static(torch.zeros(0, max_batch, device=device))  # (layers, rows): 0 = no delta

    def _static(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.static:  # CUDA graphs read it at a fixed address: it is only ever written in place
            torch._dynamo.mark_static_address(tensor)
        return tensor

    # ---- outside the decode step ----

    def refresh(self, base) -> None:
        """Give every LoRA layer of the decode path a bank (PEFT wraps more layers when an adapter targets them).
        All or nothing: a failure (out of memory) leaves the banks as they were, and the next call tries again."""
        names = tuple(getattr(base, "peft_config", {}))
        if names == self.adapters_seen:
            return
        layers = {path: module for path, module in base.model.named_modules()
                  if isinstance(module, LoraLayer) and path.startswith(DECODE_PARTS)
                  and not path.endswith(PREFILL_ONLY)}
        new = [path for path in layers if path not in self.banks]
        if new:
            before = self.banks, self.scales, self.layers
            banks = dict(self.banks)
            for path in new:  # as wide as the largest rank loaded for the layer: a later adapter rarely grows it
                base_layer, rank = layers[path].get_base_layer(), max(layers[path].r.values(), default=1)
                banks[path] = self._bank(base_layer.in_features, base_layer.out_features, rank, len(banks))
            scales = torch.zeros(len(banks), self.max_batch, device=self.device)
            scales[:len(self.banks)] = self.scales
            self.banks, self.scales, self.layers = banks, self._static(scales), layers
            try:
                for slot, owner in enumerate(self.owners):  # adapters already in the banks: their new layers
                    if owner is not None:
                        self._fill(slot, owner[0], new)
            except BaseException:
                self.banks, self.scales, self.layers = before
                raise
        self.layers, self.adapters_seen = layers, names

    def _bank(self, in_features: int, out_features: int, rank: int, index: int) -> Bank:
        a = torch.zeros(self.slots, rank, in_features, device=self.device)
        return Bank(self._static(a), self._static(a.new_zeros(self.slots, out_features, rank)), index)

    def capture(self, base, row: int) -> None:
        """After `row`'s prefill: the adapter the model has selected, with its scale, for `row`'s decode steps.
        Rows 0..row-1 are the running batch (their bank slots are kept)."""
        self.refresh(base)
        name = active_adapter(self.layers.values())
        slot = 0 if name is None else self._slot(name, set(self.row_slots[:row]))
        scales = torch.zeros(len(self.banks), dtype=self.scales.dtype)  # in the banks' order, not the model's
        for path, module in self.layers.items():
            if name is not None and name in module.lora_A:
                scales[self.banks[path].index] = module.scaling[name]
        self.row_slots[row] = slot
        self.row_slot[row] = slot
        self.scales[:, row] = scales

    def move(self, source: int, target: int) -> None:
        self.row_slots[target] = self.row_slots[source]
        self.row_slot[target] = self.row_slot[source]
        self.scales[:, target] = self.scales[:, source]

    def _slot(self, name: str, in_use: set[int]) -> int:
        """The bank slot holding adapter `name` as the model has it now (a reloaded adapter is new), filled if not."""
        identity = next(module.lora_A[name].weight for module in self.layers.values() if name in module.lora_A)
        for slot, owner in enumerate(self.owners):
            if owner is not None and owner[0] == name and owner[1] is identity:
                return slot
        free = [s for s in range(1, self.slots) if s not in in_use]
        if not free:  # every slot holds an adapter a running row uses: room for twice as many
            self._grow_slots(min(2 * (self.slots - 1), self.max_batch) + 1)
            free = [s for s in range(1, self.slots) if s not in in_use]
        slot = min(free, key=lambda s: self.owners[s] is not None)  # an empty slot first, else one no row uses
        self.owners[slot] = None  # until it is filled: a fill that fails leaves no half adapter for the next one
        self._fill(slot, name, list(self.layers))
        self.owners[slot] = (name, identity)  # the weight itself: its id cannot be reused while it is kept here
        return slot

    def _fill(self, slot: int, name: str, paths: list[str]) -> None:
        for path in paths:
            module, bank = self.layers[path], self.banks[path]
            bank.a[slot].zero_()
            bank.b[slot].zero_()
            if name not in module.lora_A:
                continue
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
            if a.shape[0] > bank.a.shape[1]:  # a larger rank than any before: the bank grows (a new compile)
                bank = self.banks[path] = self._grown(bank, a.shape[0])
            bank.a[slot, :a.shape[0]] = a
            bank.b[slot, :, :a.shape[0]] = b

    def _grown(self, bank: Bank, rank: int) -> Bank:
        grown = self._bank(bank.a.shape[2], bank.b.shape[1], rank, bank.index)
        grown.a[:bank.a.shape[0], :bank.a.shape[1]] = bank.a
        grown.b[:bank.a.shape[0], :, :bank.a.shape[1]] = bank.b
        return grown

    def _grow_slots(self, slots: int) -> None:
        """Room for more adapters: every bank regrown first, then swapped in (a failure changes nothing)."""
        before, self.slots = self.slots, slots  # _bank allocates `self.slots`
        try:
            banks = {path: self._grown(bank, bank.a.shape[1]) for path, bank in self.banks.items()}
        except BaseException:
            self.slots = before
            raise
        self.banks = banks
        self.owners += [None] * (slots - before)

    # ---- inside the decode step (compiled on CUDA): tensors only ----

    def apply(self, path: str, module, x: torch.Tensor) -> torch.Tensor:
        """`module(x)` for decode rows (batch, 1, features), each with its own adapter's delta and scale."""
        bank = self.banks.get(path)
        if bank is None:
            return module(x)
        out = module.base_layer(x)
        rows = x.shape[0]
        slots = self.row_slot[:rows]
        a, b = bank.a[slots], bank.b[slots]  # (rows, rank, in), (rows, out, rank)
        delta = torch.bmm(torch.bmm(x.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2))
        return (out + delta * self.scales[bank.index, :rows, None, None]).to(out.dtype)


def active_adapter(layers) -> str | None:
    """The adapter PEFT applies now (None: adapters disabled, or none loaded)."""
    for module in layers:
        if module.disable_adapters or module.merged:
            return None
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) > 1:
            raise ValueError(f"{len(active)} adapters active at once ({', '.join(active)}); a request selects one")
        if active:
            return active[0]
    return None
