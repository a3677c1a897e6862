"""DPT depth head: reassemble (``reassemble.py``), fusion (``fusion.py``), the head (``head.py``) and the converter
of Meta's released depther files (``meta_checkpoint.py``)."""

from .head import DPTHead, bin_centres, default_features

__all__ = ["DPTHead", "bin_centres", "default_features"]
