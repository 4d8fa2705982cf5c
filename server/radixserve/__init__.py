"""radixserve: LLM serving with a radix-tree prefix cache and continuous batching."""

__version__ = "0.1.0"

__all__ = ["Engine", "ServerArgs", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import radixserve` (the CLI, the operator's tests) does not pull in torch.
    if name == "Engine":
        from radixserve.engine.engine import Engine

        return Engine
    if name == "ServerArgs":
        from radixserve.config import ServerArgs

        return ServerArgs
    raise AttributeError(name)
