"""attention_cnn: a CNN with learned soft attention, trained through a DVC pipeline."""
