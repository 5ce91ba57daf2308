"""Fine-tuning, threshold calibration, evaluation and model bundles."""
