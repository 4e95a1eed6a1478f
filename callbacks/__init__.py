"""Public ``transformers.TrainerCallback``s of cpt: add them to any TRL/HF trainer, or subclass them.

Import them as ``cpt.callbacks``::

    from cpt.callbacks import AIMMergingCallback, EWCCallback, GeometryConflictCallback, IntegrationCallback

The code lives in the repository's top-level ``callbacks/`` folder, installed as
``cpt.callbacks`` (see setup.py). The old top-level name ``import callbacks`` (a source
checkout with the repository root on ``sys.path``) still works for one release: it warns
and hands back the very same modules, so classes and ``isinstance`` checks agree.
"""

if __name__ != "cpt.callbacks":  # imported under the deprecated top-level name
    import importlib
    import pkgutil
    import sys
    import warnings

    warnings.warn(
        f"`import {__name__}` is deprecated and will be removed in the next release; use `import cpt.callbacks` "
        "(e.g. `from cpt.callbacks import GeometryConflictCallback`)",
        DeprecationWarning,
        stacklevel=2,  # the importing line: warnings skips the import machinery's frames itself
    )
    _package = importlib.import_module("cpt.callbacks")
    for _info in pkgutil.iter_modules(_package.__path__):
        sys.modules[f"{__name__}.{_info.name}"] = importlib.import_module(f"cpt.callbacks.{_info.name}")
    sys.modules[__name__] = _package  # the import statement returns what sys.modules holds after this runs
else:
    from .aim import AIMMergingCallback
    from .ewc import EWCCallback
    from .geometry import GeometryConflictCallback
    from .integration import IntegrationCallback

    __all__ = ["AIMMergingCallback", "EWCCallback", "GeometryConflictCallback", "IntegrationCallback"]
