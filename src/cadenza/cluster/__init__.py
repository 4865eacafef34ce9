"""The cluster: a router over several engines. Placement policies and the KV index here are
torch-free and Ray-free, so the simulator runs the same objects."""
