"""ModalityBank: one central mask-to-image generator modulated per modality (mAdaFM), learned
against discriminators that stay inside each hospital."""

__version__ = "0.1.0"
