"""A ``ModelExecutor`` that prices a step instead of running a model.

The engine core hands it the scheduled batch; it advances its worker's virtual clock by the cost
model's price of the batch's shape (so the core's updates after the step happen at the step's
end time) and returns a sampled token for every chunk that samples. Tokens are a hash of
(seed, request id, position): deterministic, independent of batching and of where the KV came
from, and never an EOS or special id (turns run to the trace's output length anyway,
``ignore_eos``).
"""

from __future__ import annotations

import zlib

from cadenza.core.engine_core import SampledToken
from cadenza.core.kv_cache_manager import KVCacheManager
from cadenza.core.scheduler import SchedulerOutput
from cadenza.sim.clock import WorkerClock
from cadenza.sim.step_cost import StepCost, step_shape

FIRST_TOKEN_ID = 16  # ids below this are left to special tokens


def request_key(seed: int, request_id: str) -> int:
    return zlib.crc32(f"{seed}/{request_id}".encode())


def sampled_token(key: int, position: int, vocab_size: int) -> int:
    """The token at ``position`` of the request whose ``request_key`` is ``key``: a
    multiplicative hash (64-bit, odd constants), cheap enough to call once per output token."""
    h = ((key << 32) ^ position) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 29
    return FIRST_TOKEN_ID + h % (vocab_size - FIRST_TOKEN_ID)


class CostModelExecutor:
    def __init__(
        self,
        cost: StepCost,
        *,
        num_blocks: int,
        block_bytes: int,
        clock: WorkerClock,
        seed: int,
        vocab_size: int,
    ) -> None:
        self.cost = cost
        self.num_blocks = num_blocks
        self._block_bytes = block_bytes
        self.clock = clock
        self.seed = seed
        self.vocab_size = vocab_size
        self.busy_s = 0.0
        self.num_steps = 0
        self.last_step_s = 0.0
        self._keys: dict[str, int] = {}

    def bytes_per_block(self) -> int:
        return self._block_bytes

    def execute(self, out: SchedulerOutput, kv: KVCacheManager) -> dict[str, SampledToken]:
        seconds = self.cost.step_seconds(step_shape(out))
        self.clock.advance(seconds)
        self.busy_s += seconds
        self.num_steps += 1
        self.last_step_s = seconds
        sampled: dict[str, SampledToken] = {}
        keys, vocab_size = self._keys, self.vocab_size
        for chunk in out.chunks:
            if chunk.samples:
                request = chunk.request
                rid = request.request_id
                key = keys.get(rid)
                if key is None:
                    key = keys[rid] = request_key(self.seed, rid)
                position = len(request.all_token_ids)
                if position + 1 >= request.max_total_tokens:
                    keys.pop(rid, None)  # its last token: forget the key
                sampled[rid] = SampledToken(sampled_token(key, position, vocab_size))
        return sampled
