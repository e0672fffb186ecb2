"""A Hub id as a checkpoint: `ORG/NAME[@REVISION]` -> a local snapshot folder, through
`huggingface_hub` (its cache first; `HF_HUB_OFFLINE=1` honoured; a download, with huggingface_hub's
progress bars, where there is network). Only the files an export reads are fetched. Every failure is
one line saying what to do; nothing is written to the output before the checkpoint is on disk.

The snapshot holds symlinks into the cache's `blobs/`: the checkpoint reader follows them as it does
for any checkpoint, and the output folder may not hold anything they reach (`ple_export.outdir`).
"""

from __future__ import annotations

import re
from pathlib import Path

from ple_export.errors import UserError

# ORG/NAME, each as the Hub allows them; @REVISION a branch, tag or commit
HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[\w./-]+))?"
)
FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def is_hub_id(text: str) -> bool:
    return HUB_ID.fullmatch(text) is not None


def resolve(text: str, quiet: bool = False) -> Path:
    """The local snapshot folder of the Hub id `text` (downloaded if needed and possible)."""
    match = HUB_ID.fullmatch(text)
    if match is None:
        raise UserError(f"{text}: no such folder, and not a Hub id (ORG/NAME or ORG/NAME@REVISION)")
    repo, revision = match["repo"], match["revision"]
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        raise UserError(f"{text}: a Hub id needs huggingface_hub (pip install huggingface_hub)") from None
    if quiet:
        disable_progress_bars()
    at = f"{repo}@{revision}" if revision else repo
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=FILES)
    except errors.GatedRepoError:
        raise UserError(
            f"{at}: a gated model: accept its licence on huggingface.co/{repo}, then log in "
            "(`hf auth login`, or set HF_TOKEN)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"{at}: no such folder, and no such model on the Hub (a private one? log in, or set HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{at}: the model has no revision {revision!r} (a branch, tag or commit)") from None
    except errors.LocalEntryNotFoundError:
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE
            why = "and offline mode is on (HF_HUB_OFFLINE): unset it to download, or export from a folder"
        else:
            why = "and the Hub cannot be reached (no network?): export from a local folder instead"
        what = f"revision {revision!r}" if revision else "it"
        raise UserError(f"{at}: no such folder, and {what} is not in {where}, {why}") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"{at}: the download failed ({first})") from None
    return Path(folder)
