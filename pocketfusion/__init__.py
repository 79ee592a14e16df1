"""pocketfusion: make Stable-Diffusion-style text-to-image models run on phones.

Stages (each usable alone, each writing an artifact directory with a manifest.json):
compress → export → bench, plus generate / eval on any stage's output. Importing this package
imports no backend (torch included).
"""

__version__ = "0.2.0"
