"""Everything of vllm-moe-prune that runs inside vLLM: model classes, loader, capture."""


def plugin_logger(module: str):
    """vLLM's logger for a plugin module, placed under vLLM's own ``vllm`` logger.

    vLLM configures handlers and the level (``VLLM_LOGGING_LEVEL``) on that logger only,
    and does not let it propagate: a logger outside it prints nothing below a warning.
    """
    from vllm.logger import init_logger

    return init_logger(f"vllm.{module}")
