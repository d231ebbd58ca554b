"""What a benchmark table is: its rows, the recipe of each row's training set, and the shared budget.

Everything here is read from ``configs/benchmark.json``; a row's *recipe* (what its segmentation
network is trained on) names the stages it needs, so rows with the same recipe in different
tables (Table III's Real-CBICA and Table I's) are trained once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from modalitybank import config

__all__ = ["Budget", "Row", "Table", "benchmark_config", "iterations_variant", "load_table", "privacy_variant"]

TRAIN_KINDS = ("real", "fedavg", "synthetic", "completed")


def benchmark_config() -> dict[str, Any]:
    """``configs/benchmark.json``."""
    return config.config_file("benchmark.json")


@dataclass(frozen=True)
class Budget:
    """The segmentation budget every row of a scale gets (FedAvg: ``iterations`` per site, in
    ``fedavg_rounds`` rounds of ``iterations // fedavg_rounds`` local iterations)."""

    iterations: int
    epoch_length: int
    fedavg_rounds: int
    num_samples: int
    batch_size: int
    learning_rate: float

    @classmethod
    def of(cls, scale: str) -> Budget:
        spec = benchmark_config()["segmentation"]
        if scale not in spec:
            raise ValueError(f"no segmentation budget for scale {scale!r}; configs/benchmark.json has {sorted(spec)}")
        return cls(**spec[scale])

    @property
    def max_epochs(self) -> int:
        return max(1, -(-self.iterations // self.epoch_length))

    @property
    def local_iterations(self) -> int:
        return max(1, self.iterations // self.fedavg_rounds)


@dataclass(frozen=True)
class Row:
    """One row: its name in the table and the recipe of its training set.

    Attributes:
        train: ``real``, ``fedavg``, ``synthetic`` or ``completed``.
        centres: data centres whose cases it uses (``None``: all).
        present: modalities the row's real cases hold (``None``: all of the table's); the others
            are blanked by the bundle's ``FillMissingModalitiesd``.
        generator: ``bank`` or ``asyndgan`` for synthetic / completed rows; ``resampled``: the real
            images at the generator's resolution (no GAN: the ceiling of the synthetic rows).
        source: the source set the bank's base was pre-trained on (``lgg``, ``hgg``, ``nonbrain``).
    """

    name: str
    train: str
    experiment: str
    centres: tuple[str, ...] | None = None
    present: tuple[str, ...] | None = None
    generator: str | None = None
    source: str | None = None

    @property
    def generator_key(self) -> str | None:
        """The GAN stage this row's images come from (``None`` for real / FedAvg rows)."""
        if self.generator is None:
            return None
        if self.generator in ("asyndgan", "resampled"):
            return f"{self.generator}-{self.experiment}"
        return f"bank-{self.experiment}-{self.source}"

    @property
    def key(self) -> str:
        """A file-safe name of the recipe: equal recipes, equal keys (whatever the table or row name)."""
        parts = [self.train, self.experiment]
        if self.generator_key:
            parts.append(self.generator_key.split("-", 1)[0] + ("-" + self.source if self.source else ""))
        if self.centres:
            parts.append("+".join(self.centres))
        if self.present is not None:
            parts.append("has-" + "+".join(self.present))
        return "_".join(parts)


@dataclass(frozen=True)
class Table:
    number: int
    title: str
    experiment: str
    modalities: tuple[str, ...]
    rows: tuple[Row, ...]
    paper: dict[str, list[float]] = field(default_factory=dict)


def privacy_variant(privacy: dict[str, Any] | None) -> str:
    """The suffix of the GAN, synthesis and synthetic-row stages learned with the sites in a privacy mode
    other than the paper's (``""`` for ``standard``): ``-adversarial``, ``-dp-eps8``, ``-dp-eps1-clip0.05``."""
    if not privacy or privacy.get("mode", "standard") == "standard":
        return ""
    text = f"-{privacy['mode']}"
    if privacy["mode"] == "dp":
        text += f"-eps{privacy['epsilon']:g}"
        text += f"-delta{privacy['delta']:g}" if "delta" in privacy else ""
        text += f"-clip{privacy['clip']:g}" if "clip" in privacy else ""
    return text


def iterations_variant(bank_iterations: int | None) -> str:
    """The suffix of the GAN, synthesis and synthetic-row stages of federated GANs run for
    ``bank_iterations`` instead of the preset's (``""`` for the preset's): ``-it2000``."""
    if bank_iterations is None:
        return ""
    if bank_iterations < 1:
        raise ValueError(f"bank_iterations={bank_iterations}: need at least 1")
    return f"-it{bank_iterations}"


def load_table(number: int, rows: Sequence[str] | None = None) -> Table:
    """Table ``number`` of ``configs/benchmark.json``, restricted to the rows named in ``rows``; a table's
    ``extra_rows`` (diagnostics beyond the paper, too costly to run every time) only when ``rows`` names them."""
    tables = benchmark_config()["tables"]
    if str(number) not in tables:
        raise ValueError(f"no table {number}; configs/benchmark.json has tables {sorted(tables)}")
    spec = tables[str(number)]
    experiment = spec["experiment"]
    exp = config.experiment(experiment)
    modalities = tuple(exp["targets"])
    out = []
    extra = [r for r in spec.get("extra_rows", []) if rows and r["name"] in rows]  # diagnostics, run when named
    for r in spec["rows"] + extra:
        if r["train"] not in TRAIN_KINDS:
            raise ValueError(f"table {number}, row {r['name']}: train {r['train']!r} is not one of {TRAIN_KINDS}")
        centres = tuple(r["centres"]) if r.get("centres") else None
        present = None
        if r.get("present") == "site":  # the modalities the row's (single) centre holds in this experiment
            present = tuple(m for m in modalities if m in exp["sites"][centres[0]])  # type: ignore[index]
        out.append(Row(r["name"], r["train"], experiment, centres, present, r.get("generator"), r.get("source")))
    if rows:
        unknown = sorted(set(rows) - {r.name for r in out})
        if unknown:
            raise ValueError(f"table {number} has no rows {unknown}; its rows: {[r.name for r in out]}, "
                             f"extra rows: {[r['name'] for r in spec.get('extra_rows', [])]}")
        out = [r for r in out if r.name in rows]
    return Table(number, spec["title"], experiment, modalities, tuple(out), spec.get("paper", {}))
