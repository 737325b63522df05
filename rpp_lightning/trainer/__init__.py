"""Everything that knows Lightning: the LightningModule, its strategy, data module and callbacks."""
