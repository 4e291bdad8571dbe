"""Training: the SFT loop, its losses, and run-directory state for resuming."""
