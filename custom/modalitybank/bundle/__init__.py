"""What the MONAI bundles in ``bundles/`` call, so that the bundles need no ``scripts`` module.

Configs reach this module with ``"$import modalitybank.bundle"`` (or, where a config must also load
in an environment without this package, such as MONAI Label's, lazily through
``"$__import__('modalitybank.bundle').bundle.<fn>(...)"`` in keys MONAI Label does not read).

* ``bundles/modalitybank_generator`` — :func:`folded_generator` (its ``network_def``: the generator
  with one bank entry folded into plain convolutions, for ``verify_net_in_out`` / ``ckpt_export``),
  :func:`save_folded_state`, :func:`publish_generator` (copies a training run's generator into the
  bundle's ``models/``), :func:`label_map_items` and :func:`synthesize_items` (NIfTI label maps in,
  one NIfTI per modality out).
* ``bundles/site_discriminator`` — :class:`JointInputDiscriminator` (the site discriminator as a
  one-input network) and :func:`site_discriminator_from_bundle` (discriminator, optimiser and loss
  weights as a site builds them).
* ``bundles/tumor_segmentation`` — :func:`brats_datalist`, :func:`datalist_file`,
  :func:`load_datalist`, :func:`inference_cases` and :func:`write_metrics_json`.
* All bundles — :func:`locate_bundle_root` (the default ``bundle_root``).
"""

from modalitybank.bundle.common import locate_bundle_root
from modalitybank.bundle.discriminator import JointInputDiscriminator, site_discriminator_from_bundle
from modalitybank.bundle.generator import (
    FoldedGenerator,
    folded_generator,
    generator_modalities,
    label_map_items,
    publish_generator,
    save_folded_state,
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
    "FoldedGenerator",
    "JointInputDiscriminator",
    "brats_datalist",
    "datalist_file",
    "folded_generator",
    "generator_modalities",
    "inference_cases",
    "label_map_items",
    "load_datalist",
    "locate_bundle_root",
    "publish_generator",
    "save_folded_state",
    "site_discriminator_from_bundle",
    "synthesize_items",
    "write_metrics_json",
]
