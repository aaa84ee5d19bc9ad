"""colocate: several LLM services on one device, sharing one copy of the weights."""
from colocate.memory.cuda_devices import use_pci_bus_order
from colocate.sampling_params import SamplingParams

# Before anything initialises CUDA: CUDA's device indices then agree with NVML's.
use_pci_bus_order()

from colocate.version import __version__  # noqa: E402


def __getattr__(name):
    # LLM pulls in torch and the model; import it lazily so `import colocate`
    # stays cheap for the config and CLI paths that do not need it.
    if name == "LLM":
        from colocate.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]
