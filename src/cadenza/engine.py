"""LLMEngine: the torch engine core plus text in and out, behind the typed engine API.

``build_engine_parts`` is the factory of today's torch pieces (model runner, swap engine, disk
tier, cost profile); the torch-free ``core.engine_core.EngineCore`` runs the step loop over
them. ``LLMEngine`` adds what needs the tokenizer (prompt text → ids, ids → streamed text, stop
strings), KV export and import, and ``handle(command)`` for ``engine_api`` commands. It knows
nothing of conversations: the session layer above it (``session/layer.py``) owns the durable
history and hands it token ids.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from cadenza.config import EngineConfig
from cadenza.core.engine_core import HINT_GRACE_S, EngineCore, LoadSnapshot
from cadenza.core.eviction import CostModel
from cadenza.core.kv_events import KVEvent
from cadenza.core.kv_import import KVImporter
from cadenza.core.request import RequestStatus
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.transfer import Tier
from cadenza.engine_api import (
    AbortRequest,
    AddRequest,
    DrainEvents,
    EndSession,
    EngineCommand,
    EngineRequest,
    EngineStats,
    ExportKV,
    GetLoad,
    GetStats,
    HintResult,
    HintSession,
    ImportKV,
    ImportResult,
    PullOutputs,
)
from cadenza.kvstore.disk_tier import DiskTier
from cadenza.kvstore.kv_export import ExportedBlock, KVExport, KVLayout
from cadenza.kvstore.swap_engine import SwapEngine
from cadenza.model.source import ModelSource, load_model_source
from cadenza.output_processor import OutputProcessor
from cadenza.outputs import RequestOutput
from cadenza.runner.cost_profile_cache import load_or_profile_cost_model
from cadenza.runner.kv_io import DTYPE_NAMES, cut_chunks, gather_blocks, write_chunk
from cadenza.runner.model_runner import ModelRunner

log = logging.getLogger("cadenza.engine")

# Bytes a disk block file adds to its payload (header with the block's token ids).
_DISK_HEADER_BYTES = 4096


def profile_cache_dir(config: EngineConfig) -> str | None:
    """Where cost profiles are cached: the configured directory, else the user's cache dir."""
    configured = config.profile_cache_dir
    if configured is not None:
        return None if configured.lower() == "none" else configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cadenza")


def _cost_model(
    runner: ModelRunner, config: EngineConfig, max_model_len: int, fingerprint: str
) -> CostModel:
    if config.cache.kv_eviction_policy != "cost" or config.kv_cost_model != "profile":
        return CostModel.linear()
    model = load_or_profile_cost_model(
        runner, max_model_len, fingerprint, profile_cache_dir(config)
    )
    return model or CostModel.linear()


def _disk_tier(config: EngineConfig, block_bytes: int) -> DiskTier | None:
    cache = config.cache
    if not cache.disk_enabled:
        return None
    assert cache.kv_disk_path is not None
    capacity = (
        cache.disk_num_blocks * (block_bytes + _DISK_HEADER_BYTES)
        if cache.disk_num_blocks
        else int(cache.kv_disk_gib * 2**30)
    )
    return DiskTier(cache.kv_disk_path, capacity)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        source: ModelSource | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        source = source or load_model_source(config.model)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.fingerprint = source.fingerprint
        limit = source.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.runner = ModelRunner(source, config, self.max_model_len)
        del source  # weights now live in the runner's model only
        block_bytes = self.runner.bytes_per_block()
        cache = config.cache
        host_slots = cache.host_num_blocks or int(cache.kv_host_gib * 2**30 // block_bytes)
        self.disk = _disk_tier(config, block_bytes)
        self.swap = SwapEngine(self.runner.kv_caches, host_slots, self.disk)
        eos = (
            self.tokenizer.eos_token_ids
            if self.tokenizer is not None
            else self.model_config.eos_token_ids
        )
        self.core = EngineCore(
            config,
            self.runner,
            clock=clock,
            fingerprint=self.fingerprint,
            vocab_size=self.model_config.vocab_size,
            eos_token_ids=eos,
            max_model_len=self.max_model_len,
            transfer=self.swap,
            host_slots=host_slots,
            disk=self.disk,
            cost_model=_cost_model(self.runner, config, self.max_model_len, self.fingerprint),
        )
        self.clock = clock
        self.max_model_len = self.core.max_model_len
        self.eos_token_ids = self.core.eos_token_ids
        self.outputs = OutputProcessor(self.tokenizer, clock)
        self.layout = KVLayout(
            fingerprint=self.fingerprint,
            cache_salt=None,
            block_size=cache.block_size,
            dtype=DTYPE_NAMES[self.runner.dtype],
            num_layers=self.model_config.num_hidden_layers,
            num_kv_heads=self.model_config.num_key_value_heads,
            head_dim=self.model_config.resolved_head_dim,
        )
        self.importer = KVImporter(
            self.core.scheduler.kv.pool,
            self.core.tiers,
            self.layout,
            reserve_blocks=self.core.scheduler.reserve_blocks,
            clock=clock,
            pin_s=HINT_GRACE_S,
        )
        self._undelivered: list[RequestOutput] = []
        self._ids = itertools.count()

    # ----------------------------------------------------------------------- parts
    @property
    def scheduler(self):  # noqa: ANN201 - the core's Scheduler
        return self.core.scheduler

    @property
    def tiers(self):  # noqa: ANN201 - the core's TierManager
        return self.core.tiers

    @property
    def cost_model(self) -> CostModel | None:
        return self.core.cost_model

    def flush(self) -> None:
        """Wait for every queued KV copy (write-through to disk included) to land."""
        self.core.flush()

    def close(self) -> None:
        """Finish background copies (the engine is unusable after)."""
        self.flush()
        self.swap.close()

    # ----------------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str | None,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        session_id: str | None = None,
        num_history_tokens: int = 0,
        retention_ttl_s: float = 0.0,
        resume_token_ids: Sequence[int] = (),
    ) -> str:
        """Queue a request; raises ValueError (nothing queued) if it cannot be served.
        ``resume_token_ids``: output already generated elsewhere (see ``EngineRequest``)."""
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        text = prompt if isinstance(prompt, str) else None
        request = self.core.add_request(
            request_id,
            self._tokenize(prompt),
            params,
            priority=priority,
            cache_salt=cache_salt,
            arrival_time=arrival_time,
            session_id=session_id,
            num_history_tokens=num_history_tokens,
            retention_ttl_s=retention_ttl_s,
            resume_token_ids=resume_token_ids,
        )
        self.outputs.add(request, text, request.arrival_time)
        return request_id

    def submit(self, request: EngineRequest) -> str:
        prompt = request.prompt if isinstance(request.prompt, str) else list(request.prompt)
        return self.add_request(
            request.request_id,
            prompt,
            request.sampling_params,
            priority=request.priority,
            cache_salt=request.cache_salt,
            arrival_time=request.arrival_time,
            session_id=request.session_id,
            num_history_tokens=request.num_history_tokens,
            retention_ttl_s=request.retention_ttl_s,
            resume_token_ids=request.resume_token_ids,
        )

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt token ids instead")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate
                raise ValueError(
                    f"the prompt is not valid Unicode: {exc.reason} at character {exc.start}"
                ) from None
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, (bytes, bytearray, dict)) or not hasattr(prompt, "__iter__"):
            raise ValueError(
                f"a prompt is text or a list of token ids; got {type(prompt).__name__}"
            )
        return list(prompt)  # the core checks that they are integer ids in the vocabulary

    def abort_request(self, request_id: str, reason: str = "client") -> bool:
        request = self.core.abort_request(request_id, reason)
        self.outputs.drop(request_id)
        return request is not None

    def stop_and_export(self, request_id: str, reason: str = "migrated") -> KVExport | None:
        """Stop a request and export the KV of its tokens so far (the stop-and-copy of a live
        migration); None if it is not running here. Its blocks stay cached after the stop,
        so the export reads them before anything else can evict them."""
        request = self.core.scheduler.requests.get(request_id)
        if request is None or request.is_finished:
            return None
        tokens = list(request.all_token_ids)
        session_id = request.session_id or request_id
        salt = request.cache_salt
        self.abort_request(request_id, reason)
        return self.export_kv(session_id, tokens, salt)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.core.scheduler.kv.reset_prefix_cache()

    # ----------------------------------------------------------------------- sessions
    def hint(
        self,
        session_id: str,
        history: Sequence[int],
        *,
        cache_salt: str | None = None,
        expected_arrival_s: float | None = None,
        ttl_s: float | None = None,
    ) -> dict[str, int]:
        return self.core.hint(
            session_id,
            history,
            cache_salt=cache_salt,
            expected_arrival_s=expected_arrival_s,
            ttl_s=ttl_s,
        )

    def end_session(self, history: Sequence[int], cache_salt: str | None = None) -> None:
        self.core.end_session(history, cache_salt)

    # ----------------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every request that got a new token
        (finished requests are marked ``finished``)."""
        result = self.core.step()
        outputs = []
        for request, token in result.updated:
            stop = self.outputs.record_token(request, token.logprob, token.top)
            if stop is not None and not request.is_finished:
                self.core.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            outputs.append(self.outputs.make_output(request, request.is_finished))
        return outputs

    # ----------------------------------------------------------------------- KV moves
    def export_kv(
        self, session_id: str, history: Sequence[int], cache_salt: str | None = None
    ) -> KVExport:
        """The cached KV of ``history``'s leading full blocks, wherever they are held
        (device, host or disk), as a checksummed, layout-independent export."""
        core = self.core
        layout = KVLayout(**{**asdict(self.layout), "cache_salt": cache_salt})
        loc = core.locate_history(history, cache_salt)
        if loc.leading or not loc.num_blocks:
            return KVExport(session_id, layout, (), ())
        self.flush()  # copies in flight may still be writing the slots read below
        size = self.config.cache.block_size
        seed_parent = core.make_request("export", list(history), SamplingParams(), cache_salt)
        keys = seed_parent.block_hashes
        blocks: list[ExportedBlock] = []
        sources: list[tuple[str, int]] = []
        disk_reads: dict[int, tuple[bytes, bytes, tuple[int, ...]]] = {}
        for i, tier in enumerate(loc.tiers):
            parent = keys[i - 1] if i else seed_parent.hash_seed
            tokens = tuple(int(t) for t in history[i * size : (i + 1) * size])
            blocks.append(ExportedBlock(keys[i], parent, tokens, i * size))
            if tier == Tier.DEVICE:
                block = loc.device[i]
                assert block is not None
                sources.append(("device", block.block_id))
            elif tier == Tier.HOST:
                host = core.tiers.host
                assert host is not None
                sources.append(("host", host.entries[keys[i]].slot))
            else:
                disk_reads[i] = (keys[i], parent, tokens)
                sources.append(("disk", i))

        def read_disk(i: int):  # noqa: ANN202 - a torch tensor or None
            import torch

            assert self.disk is not None
            data = self.disk.get(*disk_reads[i])
            if data is None:
                return None
            raw = torch.frombuffer(data, dtype=torch.uint8).view(self.runner.dtype)
            return raw.view(self.swap._staging.shape)

        try:
            gathered = gather_blocks(self.runner.kv_caches, sources, self.swap.host_kv, read_disk)
        except LookupError:
            # A disk block vanished meanwhile: export the run before it.
            cut = next(i for i, (t, _) in enumerate(sources) if t == "disk")
            blocks, sources = blocks[:cut], sources[:cut]
            gathered = gather_blocks(self.runner.kv_caches, sources, self.swap.host_kv, read_disk)
        return KVExport(session_id, layout, tuple(blocks), tuple(cut_chunks(gathered)))

    def import_kv(self, export: KVExport) -> ImportResult:
        """Verify and install another engine's export as cached prefix blocks, layer by
        layer; rejected chunks are counted and their blocks never installed."""
        plan = self.importer.begin(export.layout, list(export.blocks))
        try:
            for layer in range(self.layout.num_layers):
                for chunk in export.layer_chunks(layer):
                    device, host = self.importer.accept_chunk(plan, chunk)
                    write_chunk(self.runner.kv_caches, chunk, device)
                    if host and self.swap.host_kv is not None:
                        write_chunk(self.swap.host_kv, chunk, host)
                self.importer.layer_done(plan, layer)
            for slot in plan.host_targets.values():
                self.swap.seal_host_slot(slot)
            installed, on_host = self.importer.commit(plan)
        except BaseException:
            self.importer.abort(plan)
            raise
        if plan.rejected_chunks:
            log.warning(
                "KV import for session %s: %d layer chunk(s) failed verification; %d block(s)"
                " will be recomputed",
                export.session_id,
                plan.rejected_chunks,
                plan.rejected_blocks,
            )
        return ImportResult(
            num_blocks=len(plan.blocks),
            installed_by_tier={"device": len(installed), "host": on_host},
            rejected_chunks=plan.rejected_chunks,
            rejected_blocks=plan.rejected_blocks,
            num_tokens=len(plan.blocks) * self.layout.block_size,
        )

    # ----------------------------------------------------------------------- introspection
    def load(self) -> LoadSnapshot:
        return self.core.load()

    def drain_events(self) -> list[KVEvent]:
        return self.core.drain_events()

    def stats(self) -> EngineStats:
        tiers = self.core.tiers
        kv = self.core.scheduler.kv
        return EngineStats(
            load=self.core.load(),
            num_aborted=dict(self.core.num_aborted),
            prefix_queries=kv.prefix_queries,
            prefix_hits=kv.prefix_hits,
            device_cached_blocks=kv.pool.num_cached_blocks,
            device_usage=kv.pool.usage(),
            tier_stats=asdict(tiers.stats),
            disk_stats=asdict(self.disk.stats) if self.disk is not None else None,
            disk_capacity_bytes=self.disk.capacity_bytes if self.disk is not None else 0,
            disk_used_bytes=self.disk.used_bytes if self.disk is not None else 0,
            import_rejected_chunks=self.importer.rejected_chunks,
            host_checksum_failures=int(getattr(self.swap, "checksum_failures", 0)),
        )

    @property
    def num_free_blocks(self) -> int:
        return self.core.scheduler.kv.pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.core.scheduler.kv.num_blocks

    # ----------------------------------------------------------------------- typed API
    def handle(self, command: EngineCommand) -> Any:
        """Execute one ``engine_api`` command and return its result."""
        match command:
            case AddRequest(request=request):
                return self.submit(request)
            case AbortRequest(request_id=rid, reason=reason, export=export):
                return (
                    self.stop_and_export(rid, reason) if export else self.abort_request(rid, reason)
                )
            case HintSession():
                return HintResult(
                    self.hint(
                        command.session_id,
                        command.history,
                        cache_salt=command.cache_salt,
                        expected_arrival_s=command.expected_arrival_s,
                        ttl_s=command.ttl_s,
                    )
                )
            case EndSession(history=history, cache_salt=salt):
                return self.end_session(history, salt)
            case ExportKV(session_id=sid, history=history, cache_salt=salt):
                return self.export_kv(sid, history, salt)
            case ImportKV(export=export):
                return self.import_kv(export)
            case GetLoad():
                return self.load()
            case GetStats():
                return self.stats()
            case DrainEvents():
                return self.drain_events()
            case PullOutputs():
                self._undelivered += self.step() if self.has_unfinished_requests() else []
                out, self._undelivered = self._undelivered, []
                return out
        raise TypeError(f"not an engine command: {command!r}")
