"""The YOLOv8-style detector of examples/detector_own_loop.py (one definition, used by the
example and by the zoo): C2f with list(x.chunk(2, 1)), SPPF, upsample + concat across
scales, three heads returned as a list."""
from __future__ import annotations

import importlib.util
from pathlib import Path

_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "detector_own_loop.py"
_spec = importlib.util.spec_from_file_location("detector_own_loop", _EXAMPLE)
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

ARCHS = {"yolov8-style": example.TinyYOLO}
