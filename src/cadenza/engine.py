"""LLMEngine: add_request / step / abort over the scheduler, the model runner and detokenizer."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

from cadenza.config import EngineConfig
from cadenza.core.hashing import hash_seed
from cadenza.core.request import Request, RequestStatus
from cadenza.core.sampling_params import SamplingParams
from cadenza.core.scheduler import Scheduler
from cadenza.model.source import ModelSource, load_model_source
from cadenza.output_processor import OutputProcessor
from cadenza.outputs import RequestOutput
from cadenza.runner.model_runner import ModelRunner


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        self.config = config
        source = source or load_model_source(config.model)
        self.model_config = source.config
        self.tokenizer = source.tokenizer
        self.fingerprint = source.fingerprint
        limit = source.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.runner = ModelRunner(source, config, self.max_model_len)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_blocks)
        self.outputs = OutputProcessor(self.tokenizer)
        self.eos_token_ids = (
            self.tokenizer.eos_token_ids
            if self.tokenizer is not None
            else source.config.eos_token_ids
        )
        self._ids = itertools.count()
        del source  # weights now live in the runner's model only

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
    ) -> str:
        """Queue a request; raises ValueError (nothing queued) if it cannot be served."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        text = prompt if isinstance(prompt, str) else None
        token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        max_total = self.max_model_len
        if params.max_tokens is not None:
            max_total = min(max_total, len(token_ids) + params.max_tokens)
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=tuple(self.eos_token_ids),
            block_size=self.config.cache.block_size,
            hash_seed=hash_seed(self.fingerprint, cache_salt),
            max_total_tokens=max_total,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            priority=priority,
            cache_salt=cache_salt,
        )
        self.scheduler.add_request(request)
        self.outputs.add(request, text, request.arrival_time)
        return request_id

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt token ids instead")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return [int(t) for t in prompt]

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but this model's context is "
                f"{self.max_model_len} tokens (at least one must be left to generate)"
            )

    def abort_request(self, request_id: str) -> bool:
        request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self.outputs.drop(request_id)
        return request is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv.reset_prefix_cache()

    # ----------------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, and return an output for every request that got a
        new token (finished requests are marked ``finished``)."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        sampled = self.runner.execute(plan, self.scheduler.kv)
        tokens = {rid: s.token_id for rid, s in sampled.items()}
        updated = self.scheduler.update_from_output(plan, tokens)
        results = []
        for request in updated:
            token = sampled[request.request_id]
            stop = self.outputs.record_token(request, token.logprob, token.top)
            if stop is not None and not request.is_finished:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
            results.append(self.outputs.make_output(request, request.is_finished))
        return results

    # ----------------------------------------------------------------------- introspection
    @property
    def num_free_blocks(self) -> int:
        return self.scheduler.kv.pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.scheduler.kv.num_blocks
