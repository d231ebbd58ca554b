"""The wire format and the guards on both ends, without a federation running."""

from __future__ import annotations

import numpy as np
import torch

from modalitybank.fl import wire
from modalitybank.fl.controller import check_gradient
from modalitybank.fl.ledger import Ledger
from modalitybank.fl.privacy import check_result

FAKE = np.zeros((4, 1, 16, 16), dtype=np.float32)
SENT = {"fake/t2": ((4, 1, 16, 16), "float32"), "fake/flair": ((4, 1, 16, 16), "float32")}


def _good() -> dict:
    return {"grad/t2": FAKE.copy(), "grad/flair": FAKE.copy(), "next_masks": np.full((4, 16, 16), 9, np.uint8),
            "losses": {"t2/d": 0.25, "flair/g": 1.5}}


def test_masks_round_trip() -> None:
    label = torch.tensor([[[0, 1], [2, 4]]])
    brain = torch.tensor([[[0, 1], [1, 1]]])
    codes = wire.encode_masks(label, brain)
    assert codes.dtype == np.uint8 and set(np.unique(codes)) <= wire.MASK_CODES
    back_label, back_brain = wire.decode_masks(codes)
    assert torch.equal(back_label, label) and torch.equal(back_brain, brain)


def test_guard_passes_exactly_the_declared_result() -> None:
    assert check_result(wire.TASK_STEP, SENT, _good()) == []


def test_guard_blocks_a_real_image() -> None:
    result = _good() | {"real/t2": FAKE.copy()}
    assert any("undeclared keys ['real/t2']" in p for p in check_result(wire.TASK_STEP, SENT, result))


def test_guard_blocks_wrong_shapes_dtypes_and_non_finite_values() -> None:
    bad_shape = _good() | {"grad/t2": np.zeros((4, 1, 32, 32), np.float32)}
    bad_dtype = _good() | {"grad/t2": FAKE.astype(np.float64)}
    nan = _good() | {"grad/flair": np.full_like(FAKE, np.nan)}
    missing = {k: v for k, v in _good().items() if k != "grad/flair"}
    masks = _good() | {"next_masks": np.full((4, 16, 16), 200, np.uint8)}
    loss = _good() | {"losses": {"t2/d": float("inf")}}
    for result, words in [(bad_shape, "the fake sent was"), (bad_dtype, "float64"), (nan, "non-finite"),
                          (missing, "grad/flair missing"), (masks, "not mask codes"), (loss, "finite floats")]:
        problems = check_result(wire.TASK_STEP, SENT, result)
        assert any(words in p for p in problems), (words, problems)


def test_hello_may_carry_only_modalities_masks_and_count() -> None:
    hello = {"modalities": ["t2"], "next_masks": np.zeros((4, 16, 16), np.uint8), "slices": 12}
    assert check_result(wire.TASK_HELLO, {}, hello) == []
    assert check_result(wire.TASK_HELLO, {}, hello | {"image": FAKE}) != []


def test_server_rejects_bad_gradients() -> None:
    fake = torch.zeros(2, 1, 8, 8)
    assert check_gradient(torch.zeros_like(fake), fake, 10.0) is None
    assert "non-finite" in check_gradient(torch.full_like(fake, float("nan")), fake, 10.0)
    assert "exceeds the limit" in check_gradient(torch.full_like(fake, 100.0), fake, 10.0)
    assert "shape" in check_gradient(torch.zeros(2, 1, 4, 4), fake, 10.0)


def test_ledger_records_every_key(tmp_path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    ledger.record("site-1", "sent", wire.TASK_STEP, _good(), iteration=3)
    ledger.record("site-1", "sent", wire.TASK_STEP, {}, iteration=4, status="blocked", note="undeclared")
    rows = ledger.read()
    assert [r["key"] for r in rows[:4]] == ["grad/flair", "grad/t2", "losses", "next_masks"]
    assert rows[0]["bytes"] == FAKE.nbytes and rows[0]["shape"] == [4, 1, 16, 16] and rows[0]["dtype"] == "float32"
    assert rows[-1]["status"] == "blocked" and rows[-1]["iteration"] == 4
