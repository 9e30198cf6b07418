"""Import mosaicml-streaming's datasets and writers without the parts of it this project never uses.

`import streaming` runs its package __init__, which imports streaming.vision (torchvision), streaming.text and
streaming.multimodal (transformers' tokenizers), and streaming.base.dataloader (transformers again, for the
StreamingDataLoader's batch types). torchvision is often absent, or built for another torch and raises on import
(not always ImportError); transformers costs about 2 s of CPU and ~100 MB in every process that imports streaming
(every training rank): 3.4 s for `import streaming` on this project's 2-core machine, 1.3 s (torch alone) without
them (2026-12-05). Nothing here uses those modules: they get empty stand-ins, in sys.modules before the package is
imported. StreamingDataset, Stream, MDSWriter and the storage and shared-memory helpers import as they are.

A process that imports streaming without import_streaming() needs the stand-ins too: a DataLoader worker started by
spawn or forkserver (Python 3.14's default on Linux) unpickles its dataset, which imports streaming by its class
names. qwen2_dist.data.loader installs them when it is imported (install_stand_ins), which unpickling does first.
"""

import importlib
import sys
import types

_UNUSED = ("streaming.vision", "streaming.text", "streaming.multimodal", "streaming.base.dataloader")


class _NoStreamingDataLoader:
    """Stands in for streaming's StreamingDataLoader, which qwen2_dist does not use (torch's DataLoader reads)."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("streaming.StreamingDataLoader is not imported by qwen2_dist.data.streaming_compat "
                           "(it pulls in transformers); use torch.utils.data.DataLoader")


def install_stand_ins() -> None:
    """Put the empty stand-ins for the modules of _UNUSED into sys.modules (those not imported already)."""
    for name in _UNUSED:
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            if name == "streaming.base.dataloader":
                sys.modules[name].StreamingDataLoader = _NoStreamingDataLoader


def import_streaming() -> types.ModuleType:
    """The `streaming` module, imported without the modules of _UNUSED (importable on machines without a working
    torchvision). Call it before importing any streaming submodule: that import would run the package's __init__."""
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    install_stand_ins()
    return importlib.import_module("streaming")
