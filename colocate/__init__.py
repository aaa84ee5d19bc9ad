"""colocate: several LLM services on one device, sharing one copy of the weights."""
from colocate.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch and the model; import it lazily so `import colocate`
    # stays cheap for the config and CLI paths that do not need it.
    if name == "LLM":
        from colocate.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
