"""What a simulation run is: its frozen settings, and the cost model, links and worker spec
they resolve to (``--cost-model cpu``: this engine on this machine, calibrated;
``--cost-model gpu``: a roofline of a model on a GPU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cadenza.cluster.placement import POLICY_NAMES, CostParams
from cadenza.config import CacheConfig, EngineConfig, SchedulerConfig
from cadenza.sim.cpu_cost import CPUCost, load_calibration
from cadenza.sim.hardware import GB, GIB, Links, gpu_links, gpu_spec
from cadenza.sim.model_shapes import ModelShape, model_shape
from cadenza.sim.roofline import RooflineCost, RooflineParams
from cadenza.sim.step_cost import StepCost, prefill_s_per_token
from cadenza.sim.worker import WorkerSpec

COST_MODELS = ("cpu", "gpu")
DEFAULT_MODEL = {"cpu": "smollm2-135m", "gpu": "llama-3.1-8b"}


@dataclass(frozen=True)
class SimConfig:
    workers: int = 1
    routing: str = "kv-aware"
    cost_model: str = "cpu"
    gpu: str = "A100-80GB"
    model: str | None = None  # default: smollm2-135m (cpu), llama-3.1-8b (gpu)
    seed: int = 0
    block_size: int = 16
    num_blocks: int | None = None  # device KV blocks per worker (default: what memory holds)
    kv_cache_gib: float = 1.0  # cpu: the engine's --kv-cache-memory-gib
    host_gib: float = 16.0
    disk_gib: float = 0.0
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    eviction: str = "cost"
    network_gbps: float | None = None  # default: 100 (gpu), 10 (cpu)
    network_latency_s: float | None = None
    retention_ttl_s: float = 0.0
    # SYMPHONY moves a hinted session only to a worker this many requests less loaded.
    rebalance_margin: int = CostParams.rebalance_margin
    calibration: str | None = None  # cpu: a `cadenza simulate calibrate` file
    gpu_params: tuple[str, ...] = ()  # roofline NAME=VALUE overrides
    # Optional overrides (None / the defaults: as before), used by the reproductions:
    num_kv_heads: int | None = None  # a GQA variant of the model (Pensieve's Llama-2-13B: 10)
    max_model_len: int | None = None  # longest request (default: the model's context)
    enable_prefix_caching: bool = True  # False: every prompt recomputed (vLLM v0.2)
    scheduling_policy: str = "fcfs"  # "program": Continuum's program-level FCFS

    def __post_init__(self) -> None:
        if self.workers <= 0:
            raise ValueError("workers must be positive")
        if self.routing not in POLICY_NAMES:
            raise ValueError(f"routing must be one of {', '.join(POLICY_NAMES)}")
        if self.cost_model not in COST_MODELS:
            raise ValueError(f"cost model must be one of {', '.join(COST_MODELS)}")
        if self.host_gib < 0 or self.disk_gib < 0:
            raise ValueError("host_gib and disk_gib must not be negative")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ValueError(
                f"num_blocks must be positive (or left out: what memory holds); got"
                f" {self.num_blocks}"
            )
        if self.cost_model == "cpu" and self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be positive; got {self.kv_cache_gib}")
        if self.network_gbps is not None and self.network_gbps <= 0:
            raise ValueError(f"network_gbps must be positive; got {self.network_gbps}")
        if self.network_latency_s is not None and self.network_latency_s < 0:
            raise ValueError(
                f"network_latency_s must not be negative; got {self.network_latency_s}"
            )
        if self.retention_ttl_s < 0:
            raise ValueError(f"retention_ttl_s must not be negative; got {self.retention_ttl_s}")
        if self.gpu_params and self.cost_model != "gpu":
            raise ValueError(
                "gpu_params (--gpu-param) tune the GPU roofline: use them with the gpu cost"
                " model (--cost-model gpu)"
            )

    @property
    def model_name(self) -> str:
        return self.model or DEFAULT_MODEL[self.cost_model]

    def describe(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


@dataclass(frozen=True)
class Resolved:
    cost: StepCost
    spec: WorkerSpec
    placement_costs: CostParams
    details: dict[str, Any]


def resolve(config: SimConfig) -> Resolved:
    model = model_shape(config.model_name)
    if config.num_kv_heads is not None:
        model = dataclasses.replace(model, num_kv_heads=config.num_kv_heads)
    block_bytes = model.block_bytes(config.block_size)
    details: dict[str, Any] = {"model": model.name, "block_bytes": block_bytes}
    cost: StepCost
    if config.cost_model == "gpu":
        gpu = gpu_spec(config.gpu)
        roofline = RooflineCost(model, gpu, RooflineParams().updated(list(config.gpu_params)))
        cost = roofline
        links: Links = gpu_links(gpu).with_network(config.network_gbps, config.network_latency_s)
        pool_bytes = roofline.kv_cache_bytes()
        details.update(gpu=gpu.name, roofline=dataclasses.asdict(roofline.params))
    else:
        calibration = load_calibration(config.calibration)
        if calibration.model != model.name:
            raise ValueError(
                f"the CPU calibration is of {calibration.model}, not {model.name}: the cpu"
                " cost model is this engine running the model here, and the embedded"
                f" {calibration.model} is what it can run; price {model.name} with"
                " --cost-model gpu (a roofline), or leave --model out"
            )
        cost = CPUCost(calibration)
        links = calibration.links().with_network(
            config.network_gbps if config.network_gbps is not None else 10.0,
            config.network_latency_s,
        )
        pool_bytes = int(config.kv_cache_gib * GIB)
        details.update(cpu_calibration=calibration.to_json())
    num_blocks = config.num_blocks or pool_bytes // block_bytes
    if num_blocks <= 0:
        raise ValueError("the device KV pool holds no block")
    engine = EngineConfig(
        model=model.name,
        cache=CacheConfig(
            block_size=config.block_size,
            num_blocks=num_blocks,
            kv_eviction_policy=config.eviction,  # type: ignore[arg-type]
            enable_prefix_caching=config.enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            policy=config.scheduling_policy,  # type: ignore[arg-type]
        ),
    )
    spec = WorkerSpec(
        config=engine,
        model=model,
        host_slots=int(config.host_gib * GIB // block_bytes),
        disk_blocks=int(config.disk_gib * GIB // block_bytes),
        links=links,
        fingerprint=f"sim:{model.name}",
        max_model_len=config.max_model_len or model.max_context,
        seed=config.seed,
    )
    costs = CostParams(
        prefill_s_per_token=prefill_s_per_token(cost),
        block_bytes=block_bytes,
        link_bytes_per_s=links.network,
        rebalance_margin=config.rebalance_margin,
    )
    details.update(
        num_blocks=num_blocks,
        host_slots=spec.host_slots,
        disk_blocks=spec.disk_blocks,
        links={
            k: v / GB if k != "network_latency_s" else v
            for k, v in dataclasses.asdict(links).items()
        },
        prefill_s_per_token=costs.prefill_s_per_token,
    )
    return Resolved(cost, spec, costs, details)


def describe_model(model: ModelShape) -> dict[str, Any]:
    return dataclasses.asdict(model)
