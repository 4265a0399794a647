"""Teach the backbone a new task from a few of the user's own pairs: a LoRA adapter over the frozen backbone.

    adapter   the LoRA adapter (zero-initialised up-projection: untrained = the backbone exactly), applying it per run without
              copying the backbone, its folder format (adapter.safetensors + config.json) and the backbone fingerprint
    trainer   leave-one-out in-context examples from the pairs, the backbone's SCAN-form loss, AdamW on the adapter
    pairs     the user's pair files (name_input.* / name_answer.*, or a zip of them) -> image pairs
    cli       `python -m demo_core teach PAIRS... --out ADAPTER`
"""
