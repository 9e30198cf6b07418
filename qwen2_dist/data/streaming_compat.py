"""Import mosaicml-streaming without its torchvision-dependent vision package."""

import importlib
import importlib.util
import sys
import types


def _stub_vision() -> None:
    sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")


def import_streaming() -> types.ModuleType:
    """Return the `streaming` module, importable on machines without a working torchvision."""
    # `import streaming` imports streaming.vision, which imports torchvision. torchvision is often absent, or built
    # for another torch and raises on import (not always ImportError). Nothing here uses the vision datasets, so an
    # empty stand-in module lets the rest of streaming import.
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    if importlib.util.find_spec("torchvision") is None:
        _stub_vision()
        return importlib.import_module("streaming")
    try:
        return importlib.import_module("streaming")
    except Exception:
        # Forget the half-imported package so the second import starts clean.
        for name in [n for n in sys.modules if n == "streaming" or n.startswith("streaming.")]:
            del sys.modules[name]
        _stub_vision()
        return importlib.import_module("streaming")
