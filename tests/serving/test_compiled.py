"""The decode step as one captured graph: the CUDA configuration, checked on CPU. One graph per step with nothing a
CUDA graph cannot hold, no recompilation after the warm-up whatever the requests do, the path decided once, the host
off the critical path. Compilation goes through dynamo exactly as in production (fullgraph=True: the same guards and
graphs); its backend here is aot_eager plus torch's own check of what CUDA-graph trees refuse to capture (inductor's
C++ kernels take minutes on a 2-core VM; bench/decode_step.py times them)."""

import logging

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._dynamo.utils import counters
from torch._inductor.utils import get_first_incompatible_cudagraph_node

from idefics_cog.serving.compiled import buckets
from idefics_cog.serving.decoder import FastDecoder
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.serving.layers import embed
from idefics_cog.serving.adapters import Adapters
from tests.support.engine import (
    alone,
    encoded,
    other_adapter,
    selecting,
    submit_behind_a_stream,
    submit_together,
    tokens_of,
)
from tests.support.helpers import negated_adapter, noise_image
from tests.support.inductor import buffers_at_least

pytestmark = pytest.mark.slow  # make test-fast leaves it out


class CheckedBackend:
    """aot_eager that records, for each graph compiled, the first node CUDA-graph trees would refuse to capture
    (torch's check, `get_first_incompatible_cudagraph_node`: data-dependent shapes, host syncs; None: capturable)."""

    def __init__(self):
        self.refused = []
        self.compile = aot_autograd(fw_compiler=self._forward)

    def _forward(self, graph, inputs):
        self.refused.append(get_first_incompatible_cudagraph_node(graph))
        return boxed_nop(graph, inputs)

    def __call__(self, graph, inputs):
        return self.compile(graph, inputs)


@pytest.fixture(scope="module")
def served(tiny_dir):
    """A fast path whose decode step is compiled and warmed up while the model has no adapter: PEFT wraps it only
    later (tests below), as a server started without a default adapter does at its first custom one."""
    torch._dynamo.reset()
    counters.clear()
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=4, max_images=2)
    backend = CheckedBackend()
    decoder = FastDecoder(engine.model, 4, 2, compile="on", banned_ids=engine.banned_ids, backend=backend)
    engine.scheduler.decoder = decoder
    warm = engine.run(decoder.warm_up, engine.model)
    return engine, decoder, backend, warm


def test_the_warm_up_compiles_one_graph_a_cuda_graph_can_hold(served):
    _, decoder, backend, warm = served
    assert decoder.step_mode == "compiled" and decoder.compiled is not None
    assert warm.shapes == len(buckets(decoder.max_batch, decoder.max_len)) == 4  # batches 2, 4; lengths 256, 512
    # The first shape's graph, then one with batch and length dynamic that every other shape reuses, and the same
    # without the LoRA banks.
    assert warm.graphs == len(backend.refused) == 3
    assert backend.refused == [None, None, None]
    assert not counters["graph_break"]


def test_the_check_refuses_the_models_own_embedding_lookup(served):
    """The check can fail: transformers' IdeficsDecoupledEmbedding (its `nonzero`) is refused."""
    engine = served[0]
    backend = CheckedBackend()
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    try:
        lookup = torch.compile(engine.model.model.embed_tokens.forward, backend=backend, fullgraph=True)
        lookup(torch.tensor([[1, 2]]))
    finally:
        torch._dynamo.config.capture_dynamic_output_shape_ops = False
    assert backend.refused and backend.refused[0] is not None


def test_the_embedding_lookup_is_bit_identical(served):
    table = served[0].model.model.embed_tokens
    first = table.num_embeddings
    ids = torch.tensor([[0, 5, first - 1, first, first + 1, 7], [first + 1, first, 3, 2, 1, 0]])
    with torch.inference_mode():
        assert torch.equal(embed(table, ids), table(ids))


def test_nothing_recompiles_after_the_warm_up(served, tiny_dir, tmp_path):
    """After the warm-up, with recompilation set to raise: PEFT wraps the model (the first adapter), custom adapters
    that adapt more layers (o_proj, down_proj), other scales, a mixed batch whose rows end and move, a cancel,
    a prompt past the first length bucket, then prefilled in pieces behind a stream. Every request gets its tokens
    alone (`model.generate` with its adapter)."""
    engine, decoder, backend, _ = served
    graphs = len(backend.refused)
    adapters = Adapters(engine, tmp_path / "cache")
    adapters.load_default(str(tiny_dir / "adapter"))
    customs = [str(negated_adapter(tiny_dir / "adapter", tmp_path / "negated")),
               str(other_adapter(tiny_dir / "base", tmp_path / "other", seed=5))]
    rows = [("medical", "", 1.0), ("", customs[1], 1.0), ("none", "", 1.0), ("", customs[0], 0.5),
            ("medical", "", 0.5), ("", customs[1], 1.7)]
    texts = ["What does this X-ray show?", "Tell me about lungs.", "Compare <image> and <image>.",
             "Describe it in many words. " * 30, "What is this?", "Name the organ."]
    images = [[noise_image(1)], [], [noise_image(2), noise_image(3)], [noise_image(4)], [], [noise_image(5)]]
    encs = [encoded(engine, text, imgs) for text, imgs in zip(texts, images)]
    assert encs[3].num_tokens > 256  # its decode steps attend to the 512 bucket
    lengths = [6, 20, 9, 14, 25, 12]  # rows end at different steps: the batch shrinks and rows move
    expected = [alone(engine, adapters, enc, Sampling(max_new_tokens=n, ignore_eos=True), choice)
                for enc, n, choice in zip(encs, lengths, rows)]
    engine.scheduler.chunk_tokens = 16  # behind a stream, the long prompt runs in chunks between decode steps
    jobs = [Job(enc, Sampling(max_new_tokens=n, ignore_eos=True), adapter=choice,
                select_adapter=selecting(adapters, *choice)) for enc, n, choice in zip(encs, lengths, rows)]
    cancelled = Job(encs[0], Sampling(max_new_tokens=40, ignore_eos=True))

    def cancel_after_three(items):
        def sink(item):
            items.append(item)
            if sum(len(i) for i in items if isinstance(i, list)) == 3:
                cancelled.cancel()
        return sink

    pieces = []
    piece = decoder.prefill_chunk
    decoder.prefill_chunk = lambda *args: (pieces.append(args[3]), piece(*args))[1]
    streaming = Job(encs[1], Sampling(max_new_tokens=30, ignore_eos=True),
                    select_adapter=selecting(adapters, "none", "", 1.0))
    engine.run(setattr, torch._dynamo.config, "error_on_recompile", True)  # on the thread that decodes
    try:
        received = submit_together(engine, jobs + [cancelled], {len(jobs): cancel_after_three})
        # The long prompt again, behind a stream: prefilled in pieces between decode steps.
        again = Job(encs[3], Sampling(max_new_tokens=lengths[3], ignore_eos=True), adapter=rows[3],
                    select_adapter=selecting(adapters, *rows[3]))
        behind = submit_behind_a_stream(engine, [streaming, again])
    finally:
        engine.run(setattr, torch._dynamo.config, "error_on_recompile", False)
        del decoder.prefill_chunk
    assert [tokens_of(items) for items in received[:-1]] == expected
    assert 3 <= len(tokens_of(received[-1])) < 40
    assert tokens_of(behind[1]) == expected[3] and len(pieces) > 1
    assert len(backend.refused) == graphs and decoder.step_mode == "compiled"


def test_a_failing_compiled_step_fails_its_requests_and_keeps_the_path(served, monkeypatch, caplog):
    """No quiet fallback: the step's rows end with an error, the next request is decoded by the compiled step again,
    and each prediction's log names the path that served it."""
    engine, decoder, _, _ = served
    enc = encoded(engine, "What does this X-ray show?", [noise_image(1)])
    sampling = Sampling(max_new_tokens=6, ignore_eos=True)
    compiled = decoder.compiled

    def broken(*args):
        raise RuntimeError("a kernel failed (simulated)")

    monkeypatch.setattr(decoder, "compiled", broken)
    with pytest.raises(RuntimeError, match="decoding"):
        "".join(engine.stream(enc, sampling))
    monkeypatch.setattr(decoder, "compiled", compiled)
    with caplog.at_level(logging.INFO, logger="idefics_cog.serving.scheduler"):
        "".join(engine.stream(enc, sampling))
    assert len(engine.last_stats.ids) == 6 and decoder.step_mode == "compiled"
    assert "decoded by the fast path, its decode step compiled" in caplog.text


def test_an_unchanged_batch_copies_only_its_new_tokens_to_the_host(served, monkeypatch):
    """Token ids and positions stay on the device: a decode step of an unchanged greedy batch copies nothing in
    from the host and one tensor out (its new tokens); a step after the batch changed copies its rows in once."""
    engine, decoder, _, _ = served
    counts = {"to host": 0, "from host": 0}
    tolist, tensor = torch.Tensor.tolist, torch.tensor

    def counted_tolist(self):
        counts["to host"] += 1
        return tolist(self)

    def counted_tensor(*args, **kwargs):
        counts["from host"] += 1
        return tensor(*args, **kwargs)

    scheduler = engine.scheduler
    steps = []
    step = scheduler._step

    def counted_step():
        before = dict(counts)
        step()
        steps.append({key: counts[key] - before[key] for key in counts})

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(torch, "tensor", counted_tensor)
    monkeypatch.setattr(scheduler, "_step", counted_step)
    encs = [encoded(engine, "What does this X-ray show?", [noise_image(1)]), encoded(engine, "Tell me more.")]
    received = submit_together(engine, [Job(enc, Sampling(max_new_tokens=12, ignore_eos=True)) for enc in encs])
    monkeypatch.undo()
    assert [len(tokens_of(items)) for items in received] == [12, 12]
    assert steps[0] == {"to host": 1, "from host": 1}, steps  # the batch is new: its rows copied in
    assert steps[1:] == [{"to host": 1, "from host": 0}] * (len(steps) - 1), steps


@pytest.mark.parametrize("how", ["write_rows", "through a view"])
def test_the_cache_is_written_in_place_by_inductor(how):
    """What inductor makes of the decode step's cache write (its generated code, read): `write_rows` allocates
    nothing of the cache's size; the same write through a view of the cache (the step's first version) makes inductor
    copy it, which the check catches. The batch static, then dynamic, as the compiled step's two graphs."""
    from torch._inductor.utils import run_and_get_code

    from idefics_cog.serving.layers import write_rows

    cache = torch.zeros(2, 4, 2, 65, 8)  # layers, slots, heads, columns, head_dim
    torch._dynamo.mark_static_address(cache)

    def write(batch: int, new: torch.Tensor, positions: torch.Tensor):
        rows = torch.arange(batch)
        if how == "write_rows":
            write_rows(cache, 1, rows, positions, new)
        else:
            cache[1, :batch][rows, :, positions] = new
        return cache[1, :batch, :, :16].sum()

    compiled, code = torch.compile(write, fullgraph=True), []  # as the step: a second batch size makes it dynamic
    for batch in (2, 3):
        new, positions = torch.randn(batch, 2, 8), torch.tensor([4, 9, 0][:batch])
        with torch.inference_mode():
            code += run_and_get_code(compiled, batch, new, positions)[1]
            assert torch.equal(cache[1, torch.arange(batch), :, positions], new)
    copies = buffers_at_least(code, cache[1, :2].numel())
    assert (copies == []) == (how == "write_rows"), copies


def test_an_adapter_whose_deltas_overflow_leaves_its_neighbours_unchanged(tiny_dir, tmp_path):
    """The banks compute every loaded adapter's columns for every row: an adapter whose A matrices make x A^T
    overflow to inf for a row (finite values, checked at loading, but 1e37) must not reach rows that do not use it
    (0 x inf is NaN): they keep the tokens they get alone."""
    from tests.support.helpers import adapter_copy

    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=4)
    adapters = Adapters(engine, tmp_path / "cache")
    adapters.load_default(str(tiny_dir / "adapter"))
    huge = str(adapter_copy(tiny_dir / "adapter", tmp_path / "huge",
                            tensors=lambda t: {k: v * 1e37 if "lora_A" in k else v for k, v in t.items()}))
    rows = [("medical", "", 1.0), ("", huge, 1.0), ("none", "", 1.0)]
    encs = [encoded(engine, "What does this X-ray show?", [noise_image(i)]) for i in range(3)]
    sampling = Sampling(max_new_tokens=12, ignore_eos=True)
    expected = [alone(engine, adapters, enc, sampling, choice) for enc, choice in zip(encs, rows)]
    jobs = [Job(enc, sampling, adapter=choice, select_adapter=selecting(adapters, *choice))
            for enc, choice in zip(encs, rows)]
    received = submit_together(engine, jobs)
    assert tokens_of(received[0]) == expected[0] and tokens_of(received[2]) == expected[2]
    assert engine.scheduler.largest_batch == 3
