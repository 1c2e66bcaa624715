"""The training stages: finetune, preferences, reward, rlhf (and how they are launched and configured)."""
