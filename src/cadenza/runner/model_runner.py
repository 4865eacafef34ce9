"""Runs one scheduler step on the model: flat inputs, paged KV, one forward, sampling."""

from __future__ import annotations

import torch

from cadenza.config import EngineConfig
from cadenza.core.engine_core import SampledToken
from cadenza.core.kv_cache_manager import KVCacheManager
from cadenza.core.scheduler import SchedulerOutput
from cadenza.model.llama import LlamaForCausalLM
from cadenza.model.packed_linear import pack_linears, use_onednn
from cadenza.model.source import ModelSource
from cadenza.runner.attention_backend import select_attention
from cadenza.runner.attention_metadata import AttentionMetadata
from cadenza.runner.sampler import SamplingBatch, sample
from cadenza.structured.matchers import GrammarMatchers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} needs a CUDA GPU and a CUDA build of torch; this machine has"
                " none: use device='cpu' (or 'auto')"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


class ModelRunner:
    def __init__(self, source: ModelSource, config: EngineConfig, max_model_len: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_config = source.config
        self.block_size = config.cache.block_size
        with torch.device("meta"):
            model = LlamaForCausalLM(source.config, max_model_len)
        model = model.to_empty(device="cpu")
        model.rope = type(model.rope)(source.config, max_model_len)
        if source.config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.load_hf_state_dict(source.state_dict)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.rope.to(dtype=torch.float32)
        if use_onednn(config.linear_backend, self.device, self.dtype):
            pack_linears(self.model)
        group = source.config.num_attention_heads // source.config.num_key_value_heads
        self.attention = select_attention(config.attention_backend, self.device, group)
        self.num_blocks = config.cache.num_blocks or self._blocks_for_memory()
        self.kv_caches = torch.zeros(
            self._kv_shape(self.num_blocks), dtype=self.dtype, device=self.device
        )
        self.tokenizer = source.tokenizer
        self._grammars: GrammarMatchers | None = None  # built at the first constrained request

    def grammar_matchers(self) -> GrammarMatchers:
        """The structured-output matchers (one llguidance tokenizer built on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured output needs the model's tokenizer")
            self._grammars = GrammarMatchers(
                self.tokenizer.backend.to_str(),
                self.model_config.vocab_size,
                self.tokenizer.eos_token_ids,
            )
        return self._grammars

    def _kv_shape(self, num_blocks: int) -> tuple[int, ...]:
        c = self.model_config
        return (
            c.num_hidden_layers,
            2,
            num_blocks,
            self.block_size,
            c.num_key_value_heads,
            c.resolved_head_dim,
        )

    def bytes_per_block(self) -> int:
        shape = self._kv_shape(1)
        numel = 1
        for dim in shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def _blocks_for_memory(self) -> int:
        return max(1, int(self.config.cache.kv_cache_memory_gib * 2**30 // self.bytes_per_block()))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, kv: KVCacheManager) -> dict[str, SampledToken]:
        """Run the step's forward pass; returns the sampled token of each sampling request."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []
        sampling = []
        for chunk in out.chunks:
            request = chunk.request
            table = kv.block_ids_of(request.request_id)
            # A recomputed leading hole is its own attention row over the same block table; the
            # row after it reads the hole's KV, which this layer writes before attending.
            for start, end in chunk.segments:
                input_ids.extend(request.all_token_ids[start:end])
                positions.extend(range(start, end))
                query_lens.append(end - start)
                seq_lens.append(end)
                tables.append(table)
            if chunk.samples:
                logits_rows.append(len(input_ids) - 1)
                sampling.append(request)
        meta = self._metadata(positions, query_lens, seq_lens, tables)
        device = self.device
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        rows = torch.tensor(logits_rows, dtype=torch.long, device=device)
        meta.plan = self.attention.prepare(meta)
        logits = self.model(ids, pos, self.kv_caches, meta, rows, self.attention.forward)
        self.last_logits = logits  # rows in sampling order; read by the correctness tests
        if not sampling:
            return {}
        batch = SamplingBatch(
            params=[r.sampling_params for r in sampling],
            output_token_ids=[r.output_token_ids for r in sampling],
            prompt_token_ids=[r.prompt_token_ids for r in sampling],
            eos_token_ids=sampling[0].eos_token_ids,
        )
        if self._grammars is not None or any(r.sampling_params.structured_output for r in sampling):
            masks = self.grammar_matchers().masks(sampling)
            if masks is not None:
                batch.mask_rows, batch.token_bitmask = masks.rows, masks.bitmask
        result = sample(logits, batch)
        tokens = result.token_ids.tolist()
        logprobs = result.logprobs.tolist()
        top_ids = result.top_token_ids.tolist() if result.top_token_ids is not None else None
        top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        sampled: dict[str, SampledToken] = {}
        for i, request in enumerate(sampling):
            top = None
            wanted = request.sampling_params.logprobs
            if top_ids is not None and top_lps is not None and wanted:
                top = list(zip(top_ids[i][:wanted], top_lps[i][:wanted], strict=True))
            sampled[request.request_id] = SampledToken(tokens[i], logprobs[i], top)
        return sampled

    def _metadata(
        self,
        positions: list[int],
        query_lens: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
    ) -> AttentionMetadata:
        device = self.device
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        seq_index = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
        pos = torch.tensor(positions, dtype=torch.long)
        blocks = table[seq_index, pos // self.block_size].long()
        slots = blocks * self.block_size + pos % self.block_size
        return AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_table=table.to(device),
            slot_mapping=slots.to(device),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=self.block_size,
        )


def profile_chunk_costs(
    runner: ModelRunner, starts: list[int], max_model_len: int, repeats: int = 2
) -> list[tuple[int, float]]:
    """Seconds to compute one 32-token chunk that starts at each position, keyed by the
    chunk's end position (Pensieve's ``Cost(l)``). Runs before anything is cached, so the
    scratch KV it writes is never read as anyone's prefix."""
    import time

    from cadenza.core.eviction import CHUNK_TOKENS
    from cadenza.core.request import Request
    from cadenza.core.sampling_params import SamplingParams
    from cadenza.core.scheduler import ScheduledChunk

    kv = KVCacheManager(
        runner.num_blocks, runner.block_size, enable_caching=False, clock=time.perf_counter
    )
    vocab = runner.model_config.vocab_size
    points: list[tuple[int, float]] = []
    for start in starts:
        end = start + CHUNK_TOKENS
        if end >= max_model_len or -(-end // runner.block_size) > runner.num_blocks:
            break
        request = Request(
            request_id="cost-profile",
            prompt_token_ids=[(7 * i + 3) % vocab for i in range(end)],
            sampling_params=SamplingParams(max_tokens=1),
            eos_token_ids=(),
            block_size=runner.block_size,
            hash_seed=b"",
            max_total_tokens=end + 1,
        )
        request.num_computed_tokens = start
        kv.allocate(request, end)
        step = SchedulerOutput(chunks=[ScheduledChunk(request, [(start, end)], True)])
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            runner.execute(step, kv)
            best = min(best, time.perf_counter() - t0)
        kv.free(request)
        points.append((end, best))
    return points
