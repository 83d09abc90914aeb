"""Each decode row's own LoRA adapter and scale, so that requests with different adapters share a batch, at the cost
of the adapters decoding, never per row.

PEFT applies its active adapter to every row of a forward, and torch.compile would guard on its Python-side state.
Here every Linear layer of the decode path has a bank: the A and B matrices of the adapters decoding now, side by
side in `width` rank columns (A: (width, in), B: (out, width)). An adapter of rank r takes r free columns (any ones:
there is no fragmentation) when its first row is prefilled (`capture`), and keeps them while a row uses it (also
after the model unloads it). Per layer a step computes h = x A^T for all rows at once, weighs each row's columns
(its adapter's scaling, lora_alpha / r times lora_scale as PEFT computes it, on its adapter's columns; 0 elsewhere)
and adds h B^T: two small matmuls per layer whatever the adapters of the rows, their weights read once per step,
nothing gathered per row; a row without an adapter adds zeros. The banks' shapes are fixed at setup (every decode
Linear, `width` columns), so a compiled step never recompiles for an adapter, a scale or a new layer an adapter
targets. An adapter that finds too few free columns waits (`fits`) until rows using others end.
"""

import torch
from peft.tuners.lora import LoraLayer

# Modules of the decode path only: a cross-attention block's keys and values come from the images, at prefill.
DECODE_PARTS = ("layers.", "gated_cross_attn_layers.")
PREFILL_ONLY = ("cross_attn.k_proj", "cross_attn.v_proj")


def decode_linears(inner) -> dict[str, torch.nn.Module]:
    """Every Linear layer a decode step runs, by its path under the IdeficsModel `inner`: the layer itself, under
    the LoRA wrapper when PEFT has wrapped it (the same object before and after)."""
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
    def __init__(self, linears: dict[str, torch.nn.Module], max_batch: int, width: int, device: torch.device,
                 dtype: torch.dtype, static: bool = False):
        self.linears, self.width, self.static = linears, width, static
        self.index = {path: i for i, path in enumerate(linears)}
        self.a = {path: self._static(torch.zeros(width, m.in_features, device=device, dtype=dtype))
                  for path, m in linears.items()}
        self.b = {path: self._static(torch.zeros(m.out_features, width, device=device, dtype=dtype))
                  for path, m in linears.items()}
        # Each row's weight on each column, per layer: its adapter's scaling on that adapter's columns, else 0.
        self.weights = self._static(torch.zeros(len(linears), max_batch, width, device=device, dtype=dtype))
        self.owners: dict[tuple, tuple] = {}  # (name, id of its A) -> (A, its columns, the layers it adapts)
        self.row_owner: list[tuple | None] = [None] * max_batch
        self.peft_layers: dict[str, LoraLayer] = {}
        self.adapters_seen: tuple = ()

    @staticmethod
    def bytes(base, width: int, max_batch: int) -> int:
        """What the banks of `base`'s decode layers take, `width` columns wide, in its dtype."""
        linears = decode_linears(base.model)
        values = width * (sum(m.in_features + m.out_features for m in linears.values()) + len(linears) * max_batch)
        return values * base.dtype.itemsize

    def _static(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.static:  # CUDA graphs read it at a fixed address: it is only ever written in place
            torch._dynamo.mark_static_address(tensor)
        return tensor

    def in_use(self, rows: int) -> tuple[int, set[str]]:
        """What rows 0..rows-1 need of the banks: the leading columns (an adapter takes the lowest free ones; 0 when
        no row has an adapter: a step skips the banks) and the layers their adapters adapt (an eager step skips the
        others; a compiled one computes every layer's, zeros included, to keep its shapes)."""
        keys = self._keys(rows)
        columns = max((max(self.owners[key][1]) + 1 for key in keys), default=0)
        return columns, set().union(*(self.owners[key][2] for key in keys))

    # ---- outside the decode step ----

    def _layers(self, base) -> dict[str, LoraLayer]:
        """The model's LoRA layers of the decode path now (PEFT wraps more layers when an adapter targets them)."""
        names = tuple(getattr(base, "peft_config", {}))
        if names != self.adapters_seen:
            self.peft_layers = {path: module for path, module in base.model.named_modules()
                                if path in self.index and isinstance(module, LoraLayer)}
            self.adapters_seen = names
        return self.peft_layers

    def _selected(self, base) -> tuple | None:
        """The adapter the model has selected, as (name, its first A matrix), or None (the base model alone)."""
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
        """Whether the adapter selected now can decode beside rows 0..rows-1: its columns are in the banks, or enough
        are free (held by no row). Else its request waits for rows to end."""
        selected = self._selected(base)
        if selected is None or self._key(selected) in self.owners:
            return True
        rank = self._rank(base, selected[0])  # wider than the banks: `capture` refuses it, its request fails
        return rank > self.width or rank <= self.width - self._held(rows)

    def capture(self, base, row: int) -> None:
        """After `row`'s prefill: the adapter the model has selected, with its scale, for `row`'s decode steps.
        Rows 0..row-1 are the running batch (their columns are kept)."""
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
        """The adapters rows 0..rows-1 decode with."""
        return {key for key in self.row_owner[:rows] if key is not None}

    def _held(self, rows: int) -> int:
        """Columns held by adapters rows 0..rows-1 decode with."""
        return sum(len(self.owners[key][1]) for key in self._keys(rows))

    def _add(self, base, key: tuple, name: str, weight: torch.Tensor, row: int) -> None:
        """Give adapter `name` free columns (those of adapters no running row uses are freed first) and copy its
        matrices there. A failure leaves the banks without it."""
        rank = self._rank(base, name)
        if rank > self.width:
            raise ValueError(f"an adapter of rank {rank} does not fit the decode banks' {self.width} columns "
                             f"(IDEFICS_ADAPTER_BANK_RANK)")
        kept = self._keys(row)
        for old in [k for k in self.owners if k not in kept]:
            del self.owners[old]
        taken = {column for _, columns, _ in self.owners.values() for column in columns}
        free = [column for column in range(self.width) if column not in taken]
        if rank > len(free):
            raise RuntimeError(f"no room in the decode banks for a rank-{rank} adapter (Scheduler checks `fits`)")
        columns = free[:rank]
        matrices = {path: (module.lora_A[name].weight.to(self.a[path].dtype),
                           module.lora_B[name].weight.to(self.b[path].dtype))
                    for path, module in self._layers(base).items() if name in module.lora_A}
        # Finite in float32 (checked at loading) may overflow the serving dtype: an inf here would reach every row
        # of the batch (0 x inf is NaN), so the adapter is refused, its request alone failing.
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

    def apply(self, path: str, x: torch.Tensor, columns: int | None = None, layers: set | None = None) -> torch.Tensor:
        """The Linear layer at `path` on decode rows x (rows, 1, features), each row with its adapter's delta from
        the banks' first `columns` (None: all of them, a compiled step's fixed shape; 0: the base layer alone), in
        `layers` only when given."""
        out = self.linears[path](x)
        if columns == 0 or (layers is not None and path not in layers):
            return out
        a, b = self.a[path][:columns], self.b[path][:, :columns]
        h = x.to(self.weights.dtype) @ a.t()  # (rows, 1, columns)
        weights = self.weights[self.index[path], :x.shape[0], None, :columns]
        # Masked, not only weighted: another adapter's column may overflow for this row's input (inf x 0 is NaN).
        h = torch.where(weights != 0, h * weights, 0)
        return (out + h @ b.t()).to(out.dtype)


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
