"""Each decode row's own LoRA adapter and scale, so that requests with different adapters share a batch: per decode
Linear a bank of the decoding adapters' A and B side by side in fixed rank columns, so a compiled step never
recompiles for an adapter, a scale or a layer."""

import torch
from peft.tuners.lora import LoraLayer

# A cross-attention block's keys and values come from the images, at prefill: not on the decode path.
DECODE_PARTS = ("layers.", "gated_cross_attn_layers.")
PREFILL_ONLY = ("cross_attn.k_proj", "cross_attn.v_proj")


def decode_linears(inner) -> dict[str, torch.nn.Module]:
    """Every Linear layer a decode step runs, by path; under PEFT's wrapper the same object before and after."""
    linears = {}
    for path, module in inner.named_modules():
        if not path.startswith(DECODE_PARTS) or path.endswith(PREFILL_ONLY):
            continue
        if isinstance(module, LoraLayer):
            linears[path] = module.get_base_layer()
        elif hasattr(module, "in_features") and not any(path.startswith(p + ".") for p in linears):
            linears[path] = module
    return linears


class RowLora:
    def __init__(self, linears: dict[str, torch.nn.Module], max_batch: int, bank_rank: int, device: torch.device,
                 dtype: torch.dtype, static: bool = False):
        self.linears, self.bank_rank, self.static = linears, bank_rank, static
        self.index = {path: i for i, path in enumerate(linears)}
        self.a = {path: self._static(torch.zeros(bank_rank, m.in_features, device=device, dtype=dtype))
                  for path, m in linears.items()}
        self.b = {path: self._static(torch.zeros(m.out_features, bank_rank, device=device, dtype=dtype))
                  for path, m in linears.items()}
        # Per layer, row and column: the row's adapter's scaling on that adapter's columns, else 0.
        self.weights = self._static(torch.zeros(len(linears), max_batch, bank_rank, device=device, dtype=dtype))
        self.owners: dict[tuple, tuple] = {}  # (name, id of its A) -> (A, its columns, the layers it adapts)
        self.row_owner: list[tuple | None] = [None] * max_batch
        self.peft_layers: dict[str, LoraLayer] = {}
        self.adapters_seen: tuple = ()

    @staticmethod
    def bytes(base, bank_rank: int, max_batch: int) -> int:
        linears = decode_linears(base.model)
        values = bank_rank * (sum(m.in_features + m.out_features for m in linears.values()) + len(linears) * max_batch)
        return values * base.dtype.itemsize

    def _static(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.static:  # CUDA graphs read it at a fixed address
            torch._dynamo.mark_static_address(tensor)
        return tensor

    def in_use(self, rows: int) -> tuple[int, set[str]]:
        """The leading columns rows 0..rows-1 use (0: none, the step skips the banks) and the layers they adapt."""
        keys = self._keys(rows)
        columns = max((max(self.owners[key][1]) + 1 for key in keys), default=0)
        return columns, set().union(*(self.owners[key][2] for key in keys))

    # ---- outside the decode step ----

    def _layers(self, base) -> dict[str, LoraLayer]:
        """PEFT wraps more layers when an adapter targets them."""
        names = tuple(getattr(base, "peft_config", {}))
        if names != self.adapters_seen:
            self.peft_layers = {path: module for path, module in base.model.named_modules()
                                if path in self.index and isinstance(module, LoraLayer)}
            self.adapters_seen = names
        return self.peft_layers

    def _selected(self, base) -> tuple | None:
        """(name, its first A matrix), or None for the base model alone."""
        layers = self._layers(base)
        name = active_adapter(layers.values())
        if name is None:
            return None
        weight = next(module.lora_A[name].weight for module in layers.values() if name in module.lora_A)
        return name, weight

    def _rank(self, base, name: str) -> int:
        return max(module.lora_A[name].weight.shape[0] for module in self._layers(base).values()
                   if name in module.lora_A)

    def fits(self, base, rows: int) -> bool:
        """Whether the selected adapter can decode beside rows 0..rows-1; else its request waits for rows to end."""
        selected = self._selected(base)
        if selected is None or self._key(selected) in self.owners:
            return True
        rank = self._rank(base, selected[0])  # wider than the banks: `capture` refuses it, its request fails
        return rank > self.bank_rank or rank <= self.bank_rank - self._held(rows)

    def capture(self, base, row: int) -> None:
        """After `row`'s prefill: the selected adapter and scale for its decode steps; rows 0..row-1 keep theirs."""
        selected = self._selected(base)
        self.weights[:, row] = 0
        self.row_owner[row] = None
        if selected is None:
            return
        name, weight = selected
        key = self._key(selected)
        if key not in self.owners:
            self._add(base, key, name, weight, row)
        columns = self.owners[key][1]
        scaling = torch.zeros(len(self.index), 1, dtype=self.weights.dtype)
        for path, module in self._layers(base).items():
            if name in module.lora_A:
                scaling[self.index[path]] = module.scaling[name]
        self.weights[:, row, columns] = scaling.to(self.weights.device)
        self.row_owner[row] = key

    def move(self, source: int, target: int) -> None:
        self.row_owner[target] = self.row_owner[source]
        self.weights[:, target] = self.weights[:, source]

    def _key(self, selected: tuple) -> tuple:
        return selected[0], id(selected[1])  # the weight is kept in `owners`: its id cannot be reused meanwhile

    def _keys(self, rows: int) -> set[tuple]:
        return {key for key in self.row_owner[:rows] if key is not None}

    def _held(self, rows: int) -> int:
        return sum(len(self.owners[key][1]) for key in self._keys(rows))

    def _add(self, base, key: tuple, name: str, weight: torch.Tensor, row: int) -> None:
        """Columns no running row uses are freed first; a failure leaves the banks without the adapter."""
        rank = self._rank(base, name)
        if rank > self.bank_rank:
            raise ValueError(f"an adapter of rank {rank} does not fit the decode banks' {self.bank_rank} columns "
                             f"(IDEFICS_ADAPTER_BANK_RANK)")
        kept = self._keys(row)
        for old in [k for k in self.owners if k not in kept]:
            del self.owners[old]
        taken = {column for _, columns, _ in self.owners.values() for column in columns}
        free = [column for column in range(self.bank_rank) if column not in taken]
        if rank > len(free):
            raise RuntimeError(f"no room in the decode banks for a rank-{rank} adapter (Scheduler checks `fits`)")
        columns = free[:rank]
        matrices = {path: (module.lora_A[name].weight.to(self.a[path].dtype),
                           module.lora_B[name].weight.to(self.b[path].dtype))
                    for path, module in self._layers(base).items() if name in module.lora_A}
        # Finite in float32 may overflow the serving dtype, and an inf would reach every row (0 x inf is NaN).
        if not all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in matrices.values()):
            raise ValueError(f"adapter {name}: values too large for {self.weights.dtype} (they overflow to inf)")
        for path in self.a:
            self.a[path][columns] = 0
            self.b[path][:, columns] = 0
            if path in matrices:
                a, b = matrices[path]
                self.a[path][columns[:a.shape[0]]] = a
                self.b[path][:, columns[:a.shape[0]]] = b
        self.owners[key] = (weight, columns, set(matrices))

    # ---- inside the decode step (compiled on CUDA): tensors only ----

    def apply(self, path: str, x: torch.Tensor, columns: int | None = None,
              layers: set | None = None) -> torch.Tensor:
        """`columns`: None for all (a compiled step's fixed shape), 0 for the base layer alone."""
        out = self.linears[path](x)
        if columns == 0 or (layers is not None and path not in layers):
            return out
        a, b = self.a[path][:columns], self.b[path][:, :columns]
        h = x.to(self.weights.dtype) @ a.t()  # (rows, 1, columns)
        weights = self.weights[self.index[path], :x.shape[0], None, :columns]
        # Masked, not only weighted: another adapter's column may overflow for this row (inf x 0 is NaN).
        h = torch.where(weights != 0, h * weights, 0)
        return (out + h @ b.t()).to(out.dtype)


def active_adapter(layers) -> str | None:
    """None: adapters disabled, or none loaded."""
    for module in layers:
        if module.disable_adapters or module.merged:
            return None
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) > 1:
            raise ValueError(f"{len(active)} adapters active at once ({', '.join(active)}); a request selects one")
        if active:
            return active[0]
    return None
