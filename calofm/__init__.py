"""calofm: foundation models of calorimeter showers (CaloDiT-2 style)."""

__version__ = "0.1.0"
