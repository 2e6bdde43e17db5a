"""Fail the install when pip replaced the local torch build with another one (e.g. a download)."""

import sys

import torch
import torchvision

EXPECTED = ("2.14.1", "0.29.1")
found = (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])
if found != EXPECTED:
    sys.exit(f"check_install: expected torch/torchvision {EXPECTED}, found {found}: pip changed the pinned build")
print(f"check_install: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"cuda build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
