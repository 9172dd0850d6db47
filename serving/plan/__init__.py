"""The capacity planner: memory, KV cache and throughput arithmetic for a stack, and its CLI."""
