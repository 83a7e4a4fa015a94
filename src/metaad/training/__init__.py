"""The training layer: the one LightningModule, its callbacks, DDP and resuming (all of Lightning)."""
