"""Fine-tuning: the one training loop for every task, and evaluation."""
