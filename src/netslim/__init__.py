"""netslim: Network Slimming for convolutional networks (Liu et al., ICCV 2017)."""
__version__ = "0.1.0"
