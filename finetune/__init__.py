"""Turning a base model into task models: LoRA, supervised fine-tuning, merging, sampling."""
