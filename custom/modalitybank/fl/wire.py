"""What crosses the network, and how it is packed.

Per iteration and site, one round trip: the server sends the fakes of the masks the site sent
last (``fake/<modality>``, one per modality the site holds); the site returns the gradient of its
generator loss w.r.t. each fake (``grad/<modality>``), scalar losses, and the masks of its next
batch (``next_masks``), so that the next fakes can be made without another round trip.

Masks travel as one ``uint8`` map per slice: the BraTS label (0, 1, 2, 4) plus
:data:`BRAIN_BIT` inside the brain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "BLOCKED_HEADER", "BRAIN_BIT", "ERROR_BUDGET_SPENT", "ERROR_CODES", "ERROR_DATA", "ERROR_HEADER", "ERROR_INTERNAL",
    "ERROR_SETUP", "ITERATION", "LEDGER_FILE", "LOSSES", "MASK_CODES", "MODALITIES", "NEXT_MASKS", "PRIVACY",
    "PRIVACY_HEADER", "SLICES", "TASKS", "TASK_HELLO", "TASK_STEP", "decode_masks", "describe", "encode_masks",
    "fake_key", "from_wire", "grad_key", "modality_of", "to_wire",
]

# -- tasks ----------------------------------------------------------------------------------
TASK_HELLO = "modalitybank_hello"  # site -> its modalities and first masks
TASK_STEP = "modalitybank_gan_step"  # fakes -> gradients + next masks
#: Every task of the protocol (what the site executor and the site's filters are bound to).
TASKS = (TASK_HELLO, TASK_STEP)

# -- message keys and headers ---------------------------------------------------------------
NEXT_MASKS = "next_masks"
LOSSES = "losses"
MODALITIES = "modalities"
SLICES = "slices"
#: Hello key: the site's privacy mode as it applies it (``mode``, ``source``; for ``dp`` ε, δ, clip, noise).
PRIVACY = "privacy"
#: Header of every task and result: the iteration it belongs to.
ITERATION = "iteration"
#: Result header set by a site's privacy guard when it blocked a result (the reason).
BLOCKED_HEADER = "modalitybank_blocked"
#: Result header set by a site that failed a task: one of :data:`ERROR_CODES`, chosen by the site. The
#: detail (exception text, file paths) stays in the site's own log; only the code leaves.
ERROR_HEADER = "modalitybank_error"
#: The site's data could not be read (missing or corrupt files, no slices).
ERROR_DATA = "data_error"
#: The site could not set itself up (settings, discriminators, anything but its data).
ERROR_SETUP = "setup_failed"
#: The site failed a task for another reason.
ERROR_INTERNAL = "internal"
#: A ``dp`` site whose next release would exceed its (ε, δ) budget; it contributes no more.
ERROR_BUDGET_SPENT = "privacy_budget_spent"
#: Every error code a reply may carry; a site's guard replaces anything else by :data:`ERROR_INTERNAL`.
ERROR_CODES = frozenset({ERROR_DATA, ERROR_SETUP, ERROR_INTERNAL, ERROR_BUDGET_SPENT})
#: Result header set by the executor: the privacy mode it computed the result for (the guard checks it).
PRIVACY_HEADER = "modalitybank_privacy_mode"

#: The ledger every participant keeps in its run directory (one JSON line per key sent or received).
LEDGER_FILE = "modalitybank_ledger.jsonl"

#: Added to the label inside the brain mask.
BRAIN_BIT = 8
#: Every value a mask code may take.
MASK_CODES = frozenset({0, 1, 2, 4, BRAIN_BIT, BRAIN_BIT | 1, BRAIN_BIT | 2, BRAIN_BIT | 4})


def fake_key(modality: str) -> str:
    return f"fake/{modality}"


def grad_key(modality: str) -> str:
    return f"grad/{modality}"


def modality_of(key: str) -> str:
    return key.split("/", 1)[1]


def encode_masks(label: torch.Tensor, brain: torch.Tensor) -> np.ndarray:
    """``(N, H, W)`` labels and brain mask → ``(N, H, W)`` uint8 codes."""
    return (label.to(torch.uint8) | (brain > 0).to(torch.uint8) * BRAIN_BIT).numpy()


def decode_masks(codes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, H, W)`` uint8 codes → ``(label, brain)`` tensors of the same shape."""
    t = torch.from_numpy(np.ascontiguousarray(codes))
    return t & 7, (t & BRAIN_BIT) // BRAIN_BIT


def to_wire(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A detached, contiguous numpy copy in the wire dtype (``float32`` or ``float16``)."""
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype))


def from_wire(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32).copy())


def describe(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per key: shape, dtype and bytes (arrays) or the value's type (scalars, dicts)."""
    out = []
    for key, value in sorted(data.items()):
        if isinstance(value, np.ndarray):
            out.append({"key": key, "shape": list(value.shape), "dtype": str(value.dtype), "bytes": int(value.nbytes)})
        else:
            out.append({"key": key, "shape": [], "dtype": type(value).__name__, "bytes": len(repr(value))})
    return out
