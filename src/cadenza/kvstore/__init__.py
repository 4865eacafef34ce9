"""KV blocks kept outside the GPU block pool: host memory and disk tiers."""
