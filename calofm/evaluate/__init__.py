"""Evaluation of generated showers against reference showers: observables, metrics, plots and a report folder.

`evaluate` and `METRICS` load lazily from `report` (matplotlib, h5py), so importing `observables` or `metrics`
alone stays light.
"""

__all__ = ["METRICS", "evaluate"]


def __getattr__(name: str):
    if name in __all__:
        from calofm.evaluate import report

        return getattr(report, name)
    raise AttributeError(f"module 'calofm.evaluate' has no attribute {name!r}")
