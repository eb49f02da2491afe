"""zili (自立): a self-hosted LLM inference and serving engine."""

from zili.sampling import PoolingParams, SamplingParams

__all__ = ["SamplingParams", "PoolingParams", "LLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and the engine; import it lazily so `import zili` stays light.
    if name == "LLM":
        from zili.engine.llm import LLM

        return LLM
    raise AttributeError(name)
