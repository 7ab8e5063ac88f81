"""calofm: foundation models of calorimeter showers (CaloDiT-2 style)."""

__version__ = "0.2.0"  # 0.2: checkpoints with manifests, the sampler config saved in full
