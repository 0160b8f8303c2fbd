"""Everything of vllm-moe-prune that runs inside vLLM: model classes, loader, capture."""
