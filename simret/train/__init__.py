"""Fine-tuning encoders with SimPool, single process or torchrun DDP."""
