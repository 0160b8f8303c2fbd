"""The built-in testbed: a small Qwen3-MoE trained on four text domains, shipped with the package.

It is the default model of ``vllm-moe-prune demo`` and of the tests. ``train.py``
reproduces it; ``families.py`` makes tiny random checkpoints of the other MoE families.
"""

from pathlib import Path

#: The committed checkpoint (config, safetensors, tokenizer, held-out and traffic data).
TESTBED_MODEL = Path(__file__).parent / "model"
