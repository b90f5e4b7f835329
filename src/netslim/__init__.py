"""netslim: Network Slimming for convolutional networks (Liu et al., ICCV 2017).

    import netslim
    model = netslim.build_model("vgg", depth=13, num_classes=10)
    ...train with netslim.bn_l1_(model, 1e-4) after each backward()...
    slim, report = netslim.prune(model, 0.5)             # physically smaller model
    print(netslim.count(slim, (3, 32, 32)))               # {'params', 'macs', 'flops'}
    netslim.save_checkpoint("slim.pt", slim)              # reloads from the file alone
"""
from ._version import __version__
from .checkpoint import load_any_checkpoint, load_checkpoint, save_checkpoint
from .data import BatchLoader, DataBundle, get_spec, list_datasets, load_dataset
from .errors import CheckpointError, ConfigError, DatasetError, NetslimError, PruneError
from .fuse import optimize_for_inference
from .engine import rules
from .engine.analysis import analyze
from .models import build_model, list_models
from .profile import count, measure_latency, profile
from .provenance import provenance
from .engine.mask import apply_mask
from .engine.prune import prune
from .engine.rules import register_module
from .engine.slim import apply_plan
from .config import read_config_file
from .export import export_onnx, export_torchscript
from .pipeline import PipelineConfig, list_presets, preset_config, run_pipeline
from .recalibrate import recalibrate_bn
from .sparsity import BNSparsity, SparsityCallback, bn_l1_
from .train import TrainConfig, evaluate, fit

__all__ = [
    "build_model", "list_models",
    "load_dataset", "list_datasets", "get_spec", "BatchLoader", "DataBundle",
    "fit", "evaluate", "TrainConfig", "bn_l1_", "BNSparsity", "SparsityCallback",
    "run_pipeline", "preset_config", "list_presets", "PipelineConfig", "read_config_file",
    "export_onnx", "export_torchscript",
    "prune", "apply_plan", "apply_mask", "analyze", "recalibrate_bn", "register_module", "rules",
    "count", "measure_latency", "profile", "optimize_for_inference",
    "save_checkpoint", "load_checkpoint", "load_any_checkpoint", "provenance",
    "NetslimError", "ConfigError", "DatasetError", "CheckpointError", "PruneError",
]
