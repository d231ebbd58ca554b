"""What the MONAI bundles in ``bundles/`` call, so that the bundles need no ``scripts`` module.

Configs reach this module with ``"$import modalitybank.bundle"`` (or, where a config must also load
in an environment without this package, such as MONAI Label's, lazily through
``"$__import__('modalitybank.bundle').bundle.<fn>(...)"`` in keys MONAI Label does not read).
Package code finds a bundle folder with :func:`modalitybank.resources.bundle_dir`.

* ``bundles/modalitybank_generator`` — :class:`BankGenerator` (its ``network_def``: the base and every
  bank entry, the config key ``modality`` selecting the entry; ``models/model.pt`` is its state, and
  ``torch.jit.script`` folds the selected entry in, so ``ckpt_export`` needs one step),
  :func:`load_weights`, :func:`save_model_checkpoint`, :func:`publish_generator` (a training run's
  generator into the bundle's ``models/``: store layout and ``model.pt``), :func:`label_map_items`
  and :func:`synthesize_items` (NIfTI label maps in, one NIfTI per modality out);
  :class:`FoldedGenerator` / :func:`folded_generator` (one entry folded into plain convolutions).
* Training engine (``modalitybank.bundle.engine``, used by the generator's ``pretrain.json`` /
  ``train.json`` and the discriminator's ``train.json``) — :class:`GanTrainer`, a MONAI
  ``SupervisedTrainer`` whose iteration is :func:`modalitybank.gan.gan_step`; :class:`GanCheckpoint`
  (checkpoint, ``metrics.jsonl`` and resume in the run folder, as ``modalitybank.training``);
  :class:`SiteBatches` (one batch per site and iteration); :func:`pretrain_generator`,
  :func:`bank_generator`, :func:`entry_parameters`, :func:`site_models`, :func:`pretrain_meta`,
  :func:`bank_meta`, :func:`run_summary`.
* ``bundles/site_discriminator`` — :class:`JointInputDiscriminator` (the site discriminator as a
  one-input network, its ``network_def``), :func:`site_discriminator_from_bundle` (discriminator,
  optimiser and loss weights as a federated site builds them), :func:`modality_dataset` and
  :func:`save_state` (the demo weights), :func:`realism_items`, :func:`realism_volume` and
  :func:`score_items` (inference: (label map, image) pairs → realism map NIfTI + JSON per case).
* ``bundles/tumor_segmentation`` — :func:`brats_datalist`, :func:`datalist_file`,
  :func:`load_datalist`, :func:`inference_cases` and :func:`write_metrics_json`.
* All bundles — :func:`locate_bundle_root` (the default ``bundle_root``).
"""

from modalitybank.bundle.common import locate_bundle_root
from modalitybank.bundle.discriminator import (
    JointInputDiscriminator,
    modality_dataset,
    realism_items,
    realism_volume,
    save_state,
    score_items,
    site_discriminator_from_bundle,
)
from modalitybank.bundle.engine import (
    GanCheckpoint,
    GanTrainer,
    SiteBatches,
    bank_generator,
    bank_meta,
    entry_parameters,
    pretrain_generator,
    pretrain_meta,
    run_summary,
    site_models,
)
from modalitybank.bundle.generator import (
    BankGenerator,
    FoldedGenerator,
    folded_generator,
    generator_modalities,
    label_map_items,
    load_weights,
    publish_generator,
    save_model_checkpoint,
    synthesize_items,
)
from modalitybank.bundle.segmentation import (
    brats_datalist,
    datalist_file,
    inference_cases,
    load_datalist,
    write_metrics_json,
)

__all__ = [
    "score_items",
    "save_state",
    "realism_volume",
    "realism_items",
    "modality_dataset",
    "GanCheckpoint",
    "GanTrainer",
    "SiteBatches",
    "bank_generator",
    "bank_meta",
    "entry_parameters",
    "pretrain_generator",
    "pretrain_meta",
    "run_summary",
    "site_models",
    "BankGenerator",
    "FoldedGenerator",
    "JointInputDiscriminator",
    "brats_datalist",
    "datalist_file",
    "folded_generator",
    "generator_modalities",
    "inference_cases",
    "label_map_items",
    "load_datalist",
    "load_weights",
    "locate_bundle_root",
    "publish_generator",
    "save_model_checkpoint",
    "site_discriminator_from_bundle",
    "synthesize_items",
    "write_metrics_json",
]
