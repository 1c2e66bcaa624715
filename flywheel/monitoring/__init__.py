"""flywheel monitor: drift and quality checks on the deployed model, and the call for retraining."""
