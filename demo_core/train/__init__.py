"""Training entry points, one per trained part: `python -m demo_core.train {tokenizer,backbone,refiner}`."""
