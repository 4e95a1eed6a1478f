"""Training-time strategies (METHOD §4): sequential fine-tuning, replay, EWC."""
