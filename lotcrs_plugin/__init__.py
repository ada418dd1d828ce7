"""LOT-CRS for CRSLab: a plugin that makes CRSLab 0.1.2 run on today's Python stack and adds
long-tail conversational recommendation (simulated balanced data, pre-training, retrieval).

Importing this package is cheap: torch, transformers and CRSLab are imported only by
:func:`register` and by the modules that need them, so ``crslab --help`` stays quick.
"""

__version__ = "0.1.0"


def register() -> None:
    """Fill CRSLab's tables with the plugin's parts and those of every installed plugin.

    Idempotent; refuses a name that CRSLab or another plugin already uses for something else.
    """
    from lotcrs_plugin.registry import register_all

    register_all()


__all__ = ["__version__", "register"]
