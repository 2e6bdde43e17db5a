"""Shared vocabulary of memefx: token segment ids and confounder-stratum kinds.

A leaf module (no memefx imports) so that data, models, attribution and causal code agree on these
values without importing each other.
"""

from __future__ import annotations

# Which modality each token position carries; MIDAS splits attention by these.
SPECIAL, TEXT, IMAGE, PAD = 0, 1, 2, 3
SEGMENT_NAMES = {SPECIAL: "special", TEXT: "text", IMAGE: "image", PAD: "pad"}

# Confounder strata: ``shared_image`` (same picture, the text varies) and ``shared_text`` (same words,
# the picture varies), with the confounder-table column naming each group's anchor.
KINDS = ("shared_image", "shared_text")
KIND_COLUMN = {"shared_image": "img_org_id", "shared_text": "txt_org_id"}
# the batch key (and data-frame column) holding each meme's stratum id of a kind (-1: none)
STRATUM_COLUMN = {"shared_image": "stratum_image", "shared_text": "stratum_text"}
